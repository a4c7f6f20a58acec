"""``OwnKnowledgeModule``: a method whose loss terms also read knowledge it makes itself.

Self-distillation methods add entries to a step's knowledge that no model argument produces:
BYOT's exits (``exit<i>``, ``exit<i>.embedding``), CS-KD's partners (``partner``,
``partner.found``). Loss terms name them like any model; this base resolves those names, hooks
only the layers of real models, and refuses at construction a term that reads knowledge the
method never makes.
"""

from __future__ import annotations

from typing import Any

from kd_lightning.methods.base import DistillationModule
from kd_lightning.objective import LossTerm, Objective
from kd_lightning.validation import number


def refuse_ignored(given: dict[str, Any], loss_terms: list[LossTerm] | None) -> None:
    """Arguments that only build the default objective may not be set beside ``loss_terms``."""
    if loss_terms is None:
        return
    names = sorted(k for k, v in given.items() if v is not None)
    if names:
        raise ValueError(
            f"{names} only build the default objective, and loss_terms replaces it: set the "
            f"temperature and weights on your loss terms and leave {names} unset"
        )


def check_weight(name: str, value: float, upper: float | None = None) -> None:
    """``value`` must be a number >= 0 (and <= ``upper``)."""
    value = number(name, value)
    if not value >= 0 or (upper is not None and value > upper):
        bound = f"[0, {upper}]" if upper is not None else ">= 0"
        raise ValueError(f"{name} must be {'in ' if upper is not None else ''}{bound}, got {value}")


class OwnKnowledgeModule(DistillationModule):
    """Base of methods with knowledge of their own (see the module docstring).

    A subclass calls ``super().__init__(models=..., loss_terms=None, ...)``, sets what
    :meth:`own_knowledge` needs, then :meth:`set_objective` with its terms.
    """

    student_args = ("student",)
    teacher_args = ()

    def set_objective(self, loss_terms: list[LossTerm]) -> None:
        """Install the objective after the method's own knowledge is known.

        Raises:
            ValueError: a term reads knowledge the method does not make (the message lists it).
        """
        self.objective = Objective(loss_terms)
        names = self.knowledge_names()
        for term in self.objective:
            bad = [
                key
                for side in ("student", "teacher")
                for key in term.keys(side, names)
                if key not in names and key.partition(".")[0] not in self.sources
            ]
            if bad:
                raise ValueError(
                    f"loss term {term.name!r} reads {bad}, which {type(self).__name__} does not "
                    f"make: its knowledge is {names} and hooked model layers ('student.<layer>'); "
                    "set the term's student and teacher to one of them"
                )
        self._make_captures()
