"""Array views that skip reference counting, for the hot paths of compiled kernels.

Numba counts references to an array's memory: every view (a slice, a row, a reshape) and every array passed to a
compiled function that is not inlined adds one and drops one, each an atomic add on the owner's counter. A decode
step's attention makes hundreds of them per (row, KV head) job: over a short cache, where a job's arithmetic is a
few hundred cycles, the counting was two thirds of the time (perf: NRT_incref and NRT_decref 41% of the samples,
SmolLM2, one row at depth 1); over a long one, each 64-key tile's views and calls cost a fifth of it (SmolLM2's
decode step at depth 4096 on one thread: 8.1-8.4 -> 6.3 ms without them). Where two threads take views of one array
(the KV cache, the batch's queries and outputs) both write its counter, and the cache line holding it moves between
the cores at every view.

`borrowed(a)` is `a` without the link to its owner: views of it are counted against nobody (Numba's NRT_incref and
NRT_decref return at once for a null owner). The memory must stay alive while the view is used: borrow a function's
arguments (the caller holds them), views of them, or arrays a live variable holds; never a fresh allocation that
nothing else holds.
"""
from numba import types
from numba.core import cgutils, ir_utils
from numba.extending import intrinsic


@intrinsic
def borrowed(typingctx, array):
    """array, its owner (meminfo) set to none: its views and its passing are not reference counted."""
    if not isinstance(array, types.Array):
        return None

    def codegen(context, builder, signature, args):
        view = context.make_array(array)(context, builder, value=args[0])
        view.meminfo = cgutils.get_null_value(view.meminfo.type)
        return view._getvalue()
    return array(array), codegen


def _aliases_its_argument(lhs, args, alias_map, arg_aliases):
    ir_utils._add_alias(lhs, args[0].name, alias_map, arg_aliases)  # lhs: the result variable's name


# Numba's parallel passes must know that `borrowed(a)` is `a`: an unknown call's array result is taken for a new
# array, and a prange loop that only writes a new array that nothing reads is removed as dead code (the writes to a
# borrowed output then never happened).
ir_utils.alias_func_extensions[("borrowed", __name__)] = _aliases_its_argument
