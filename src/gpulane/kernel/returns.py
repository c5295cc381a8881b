"""What comes back from a ``%%gpu`` cell: the names it assigns, the inputs it changes in place,
and the value of its last expression (the cell's ``Out``).

The kernel decides which names (:func:`names_to_return`, from the code and the values it sent);
the worker packs them with the last expression's value under one size guard
(:func:`pack_returns`).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gpulane.jobs import format_bytes
from gpulane.kernel.names import CHANGED, names_assigned, names_mutated
from gpulane.kernel.transfer import Packed, TransferTooLarge, pack

# The key the last expression's value travels under beside the names: never a Python name.
RESULT = "<result>"

# Arrays, tensors and frames have many methods that only read (``arr.sum()``, ``df.head()``):
# such a value comes back after a method call only if the method changes it in place.
_IN_PLACE_METHODS = {
    "numpy": {"sort", "fill", "resize", "put", "itemset", "partition", "setfield", "byteswap"},
    "pandas": {"insert", "pop", "update"},
}


def names_to_return(
    code: str,
    returns: tuple[str, ...] | None,
    no_return: Iterable[str],
    sent: Mapping[str, Any],
) -> tuple[str, ...]:
    """The names the worker sends back: ``returns`` if given (``--return``), else the names the
    cell assigns, then the inputs (``sent``) it changes in place; less ``no_return``."""
    left_out = set(no_return)
    if returns is not None:
        return tuple(name for name in returns if name not in left_out)
    names = dict.fromkeys(names_assigned(code))
    for name, how in names_mutated(code).items():
        if name in sent and not name.startswith("_") and _changed(sent[name], how):
            names.setdefault(name)
    return tuple(name for name in names if name not in left_out)


def _changed(value: Any, how: set[str]) -> bool:
    if isinstance(value, types.ModuleType | types.FunctionType | type):
        return False  # `np.random.seed(0)`: a module, function or class is not sent back
    if CHANGED in how:
        return True
    family = type(value).__module__.partition(".")[0]
    if family == "torch" and _is_tensor(value):
        return any(method.endswith("_") and not method.startswith("_") for method in how)
    in_place = _IN_PLACE_METHODS.get(family)
    return in_place is None or bool(how & in_place)


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def pack_returns(
    names: Mapping[str, Any], value: Any, spill_dir: Path | None, max_transfer: int
) -> tuple[Packed | None, list[str], bool]:
    """The names and the last expression's value (None: no value), packed together under the
    size guard; with one-line notes, and whether the value must be shown where it was made
    (it cannot be pickled, or is too large: the names still come back)."""
    notes: list[str] = []
    show_value = False
    if value is not None:
        try:
            packed = pack({**names, RESULT: value}, spill_dir, max_transfer)
        except TransferTooLarge as error:
            size = format_bytes(error.sizes.get(RESULT, 0))
            notes.append(
                f"the cell's result ({size}) is too large to come back as Out "
                f"(transfer limit {format_bytes(max_transfer)}): shown, not returned"
            )
            show_value = True
        except OSError:
            show_value = True  # the names alone may still fit; the error is said below if not
        else:
            reason = packed.skipped.pop(RESULT, None)
            if reason is None:
                return packed, notes, False
            notes.append(f"the cell's result cannot come back as Out ({reason}): shown instead")
            return packed, notes, True
    try:
        return pack(names, spill_dir, max_transfer), notes, show_value
    except (TransferTooLarge, OSError) as error:
        notes.append(f"results not returned: {error}")
        return None, notes, show_value
