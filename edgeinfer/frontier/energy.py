"""Energy of a stretch of work, from the best source the machine offers.

1. RAPL (Intel and AMD CPUs on Linux): the package energy counters /sys/class/powercap/intel-rapl:N/energy_uj
   (microjoules, wrapping at max_energy_range_uj), summed over packages. They count the whole package, so other
   programs' work on the machine is included.
2. A discharging battery: /sys/class/power_supply/BAT*/power_now (microwatts), or current_now x voltage_now,
   read at the start and the end; the mean of the two times the elapsed time.
3. Otherwise an estimate: this process's CPU time (user + system, all threads) times `watts`, the power one busy
   core draws; marked "estimated".
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import psutil

POWERCAP = Path("/sys/class/powercap")
POWER_SUPPLY = Path("/sys/class/power_supply")
DEFAULT_WATTS = 10.0  # per busy core: a laptop or desktop core at full load draws 5-15 W
JOULES_PER_KWH = 3.6e6


def _read_number(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@dataclass
class Reading:
    """What a meter saw at the start of a stretch of work."""

    wall: float
    value: object


class RaplMeter:
    """The package domains' energy counters (top-level intel-rapl:N zones; their subzones are parts of them)."""

    source = "rapl"

    def __init__(self, root: Path = POWERCAP):
        self.zones = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1
                            and _read_number(p / "energy_uj") is not None)

    @property
    def available(self) -> bool:
        return bool(self.zones)

    def start(self) -> Reading:
        return Reading(time.perf_counter(), [_read_number(z / "energy_uj") for z in self.zones])

    def joules(self, start: Reading) -> float:
        total = 0
        for zone, before in zip(self.zones, start.value):
            after = _read_number(zone / "energy_uj")
            if after is None or before is None:
                continue
            if after < before:  # the counter wrapped
                after += _read_number(zone / "max_energy_range_uj") or 0
            total += after - before
        return total / 1e6


class BatteryMeter:
    """A discharging battery's power draw (power_now, or current_now x voltage_now)."""

    source = "battery"

    def __init__(self, root: Path = POWER_SUPPLY):
        self.batteries = [p for p in sorted(root.glob("BAT*"))
                          if (p / "status").is_file() and (p / "status").read_text().strip() == "Discharging"
                          and self._watts(p) is not None]

    @staticmethod
    def _watts(battery: Path) -> float | None:
        power = _read_number(battery / "power_now")
        if power is not None:
            return power / 1e6
        current, voltage = _read_number(battery / "current_now"), _read_number(battery / "voltage_now")
        return None if current is None or voltage is None else current * voltage / 1e12

    @property
    def available(self) -> bool:
        return bool(self.batteries)

    def _total_watts(self) -> float:
        return sum(self._watts(b) or 0.0 for b in self.batteries)

    def start(self) -> Reading:
        return Reading(time.perf_counter(), self._total_watts())

    def joules(self, start: Reading) -> float:
        elapsed = time.perf_counter() - start.wall
        return (start.value + self._total_watts()) / 2 * elapsed


class CpuTimeEstimate:
    """This process's CPU seconds times the watts of one busy core: an estimate, not a measurement."""

    source = "estimated"
    available = True

    def __init__(self, watts: float = DEFAULT_WATTS, cpu_seconds=None):
        self.watts = watts
        self._cpu_seconds = cpu_seconds or (lambda: sum(psutil.Process().cpu_times()[:2]))

    def start(self) -> Reading:
        return Reading(time.perf_counter(), self._cpu_seconds())

    def joules(self, start: Reading) -> float:
        return (self._cpu_seconds() - start.value) * self.watts


def pick_meter(watts: float = DEFAULT_WATTS, powercap: Path = POWERCAP, power_supply: Path = POWER_SUPPLY):
    """The first available of RAPL, a discharging battery, the CPU-time estimate at `watts` per busy core."""
    for meter in (RaplMeter(powercap), BatteryMeter(power_supply)):
        if meter.available:
            return meter
    return CpuTimeEstimate(watts)


def cost_per_1k_tokens(joules_per_token: float | None, price_kwh: float | None) -> float | None:
    """Price of the energy of 1,000 tokens at price_kwh per kWh (None when either is unknown)."""
    if joules_per_token is None or price_kwh is None:
        return None
    return joules_per_token * 1000 / JOULES_PER_KWH * price_kwh
