"""What a reference checkpoint may name: the Learner and ParameterList, as inert stubs.

Both readers (torch's weights-only one for zip files, ours for the legacy format) map these names
to the stubs below and refuse every other global.
"""
from __future__ import annotations

from pathlib import Path
from types import MappingProxyType


# Where the reference code defines its Learner (both the ANML and the OML repositories keep it in
# model/learner.py and run their scripts from the repository root).
LEARNER_NAMES = ("model.learner.Learner",)
PARAMETER_LIST_NAME = "torch.nn.modules.container.ParameterList"
_MAX_EXTRA_LEARNER_NAMES = 4  # forks that moved the Learner; bounded so a file cannot loop us


class _Recorded:
    """Stands in for a class named in the file: keeps the pickled state and has no behaviour.

    The weights-only unpickler creates it with `cls.__new__` and hands it its state through
    `__setstate__`, so no code of the original class (or ours, beyond this) ever runs.
    """

    # What a stub reads as when the file created it but never gave it a state.
    recorded_state = MappingProxyType({})

    def __setstate__(self, state):
        # Protocol-2 pickles may carry (dict_state, slot_state); only the dict matters here.
        if isinstance(state, tuple) and len(state) == 2:
            state = state[0]
        self.__dict__["recorded_state"] = state if isinstance(state, dict) else {}


class _LearnerStub(_Recorded):
    pass


class _ParameterListStub(_Recorded):
    pass



def _refusal_message(path: Path, refused: str) -> str:
    return (f"{path}: refused to load: the file names the global {refused}, which is neither a "
            f"tensor type nor a reference Learner (nothing in the file was run)")


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[0] if lines else "no detail"
    return line if len(line) <= 200 else line[:197] + "..."

