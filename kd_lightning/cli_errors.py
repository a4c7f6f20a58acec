"""What ``kd-lightning`` prints when something goes wrong, and the noise it keeps out of a run.

**Errors first.** LightningCLI instantiates the config through jsonargparse, which wraps an
exception raised inside a class's ``__init__`` (``PretrainedTeacher`` with a missing file,
``SoftTargetKLLoss(temperature=0)``, a negative loss weight) in one "Does not validate against
any of the Union subtypes" error per nesting level, each quoting the whole config: the sentence
that names the fix ended up 80-130 lines down. :func:`user_message` walks the exception chain
(``__cause__`` / ``__context__``) past every wrapper raised by the argument parser and returns the
first sentence raised by anything else: the library's own message, or a user class's. A pure
parser error (an unknown ``class_path``, an unrecognised option) becomes one line naming the
config key. The CLI prints that line alone (exit status 2); the traceback is shown with
``--traceback`` or ``KD_LIGHTNING_TRACEBACK=1``. An exception that is neither a configuration
error nor a sentence of this library (a bug, a torch error during training) keeps its traceback.

**Noise.** :func:`quiet_known_noise` installs every filter of a CLI run, each with its reason.
Filters match one known message each; nothing of category ``Error`` is ever filtered.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

TRACEBACK_ENV = "KD_LIGHTNING_TRACEBACK"
TRACEBACK_FLAG = "--traceback"
EXIT_USAGE = 2

# Frames of these files belong to the argument parser: their exceptions wrap the real one.
_PARSER_FILES = (
    f"{os.sep}jsonargparse{os.sep}",
    f"{os.sep}argparse.py",
    f"{os.sep}lightning{os.sep}pytorch{os.sep}cli.py",
)
_PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep
# Exception types whose message, raised by this library, is a sentence for the user.
_SENTENCE_TYPES = (ValueError, TypeError, LookupError, OSError, ImportError)
_UNION_NOISE = "Does not validate against any of the Union subtypes"


class CLIError(ValueError):
    """A command line that cannot run as given; the message names the fix."""


def _raised_in(error: BaseException) -> str:
    """The file of the frame that raised ``error`` ("" when it has no traceback)."""
    tb = error.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename


def _from_parser(error: BaseException) -> bool:
    return any(part in _raised_in(error) for part in _PARSER_FILES)


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what caused it (``__cause__``, else an unsuppressed ``__context__``)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        if current.__cause__ is not None:
            current = current.__cause__
        elif not current.__suppress_context__:
            current = current.__context__
        else:
            current = None


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


def _parser_message(chain: list[BaseException]) -> str:
    """One line for an error of the parser itself: the config key, then the innermost reason."""
    keys: list[str] = []
    for error in chain:
        match = re.match(r'\s*Parser key "([^"]+)"', str(error))
        if match and (not keys or keys[-1] != match.group(1)):
            keys.append(match.group(1))
    reasons = [
        _one_line(e)
        for e in chain
        if str(e).strip()
        and not str(e).lstrip().startswith(("Parser key", _UNION_NOISE))
        and "Given value" not in str(e)
    ]
    # The innermost wrapper that still names the class_path reads better than the bare cause.
    reason = reasons[-1] if reasons else _one_line(chain[-1])
    for text in reversed(reasons):
        if text.startswith("Problem with given class_path"):
            reason = text
            break
    if keys:
        return f"{'.init_args.'.join(keys)}: {reason}"
    return reason


def user_message(error: BaseException) -> str | None:
    """The sentence to show for ``error``, or ``None`` when its traceback must be shown.

    A configuration error (anything the argument parser raised or wrapped) gives the first
    sentence in the chain not raised by the parser, or a one-line parser message. Outside the
    parser, an error gives its sentence when this library raised it on purpose: a
    :class:`CLIError`, or one of ValueError, TypeError, LookupError, OSError, ImportError (and
    their subclasses) or an exception class of this library (``NonFiniteTraining``,
    ``TeacherCacheError``, ...) raised from a frame of ``kd_lightning``.
    """
    chain = list(exception_chain(error))
    if any(_from_parser(e) for e in chain):
        for e in chain:
            if not _from_parser(e) and str(e).strip():
                return _one_line(e) if "\n" not in str(e).strip() else str(e).strip()
        return _parser_message(chain)
    if isinstance(error, CLIError):
        return str(error)
    ours = type(error).__module__.startswith(f"{__package__}.")  # NonFiniteTraining, ...
    if (isinstance(error, _SENTENCE_TYPES) or ours) and _raised_in(error).startswith(_PACKAGE_DIR):
        message = str(error)
        if isinstance(error, KeyError) and len(error.args) == 1:
            message = str(error.args[0])  # KeyError's str() adds quotes
        return message
    return None


def wants_traceback(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether the traceback is asked for (flag or environment); ``argv`` without the flag."""
    rest = [a for a in argv if a != TRACEBACK_FLAG]
    env = os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return env or len(rest) != len(argv), rest


def run_with_clean_errors(
    prog: str, run: Callable[[list[str]], object], argv: list[str], strip: bool = True
) -> object:
    """Call ``run(argv)``; on a user-facing error print ``<prog>: error: <sentence>``, exit 2.

    ``strip=False`` leaves ``--traceback`` in ``argv`` for a command that reads it itself.
    """
    show_traceback, rest = wants_traceback(argv)
    if strip:
        argv = rest
    try:
        return run(argv)
    except Exception as error:
        message = None if show_traceback else user_message(error)
        if message is None:
            raise
        sys.stdout.flush()
        print(f"{prog}: error: {message}", file=sys.stderr)
        print(
            f"(the traceback: rerun with {TRACEBACK_FLAG}, or set {TRACEBACK_ENV}=1)",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_USAGE) from None


# --------------------------------------------------------------------------- noise
class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_TIPS_FILTER = _DropMessages("💡 Tip:")


def quiet_known_noise() -> None:
    """Install the filters of a CLI run (idempotent). Each line says why it is safe."""
    # Lightning advertises its optional cloud services (LitLogger, litmodels) on every run;
    # they are not dependencies of this project and the tip asks nothing of the user.
    tips_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _TIPS_FILTER not in tips_logger.filters:
        tips_logger.addFilter(_TIPS_FILTER)
    # torch 2.13 deprecates isinstance(treespec, LeafSpec); Lightning's own _pytree calls it.
    warnings.filterwarnings(
        "ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning
    )
    # jsonargparse 4.49+ deprecations raised by LightningCLI's own calls into it, not ours.
    warnings.filterwarnings(
        "ignore", category=DeprecationWarning, module=r"lightning\.pytorch\.cli"
    )
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"jsonargparse")
    # A frozen teacher is in eval mode by design (it must not update BatchNorm statistics).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode", category=UserWarning)
    # With no logger configured Lightning uses CSVLogger and suggests installing tensorboard;
    # CSVLogger is the intended default here.
    warnings.filterwarnings(
        "ignore", message=r"Starting from v1\.9\.0, `tensorboardX` has been removed"
    )


def quiet_evaluation_noise() -> None:
    """Filters of ``validate``/``test``/``predict``, which write no checkpoint."""
    # Restoring a checkpoint in another run folder, ModelCheckpoint says it will not reload its
    # best-k bookkeeping: only fit (resuming) uses that state.
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from .* won't be reloaded")


def quiet_first_run_checkpoint_dir(dirpath: str | Path) -> None:
    """Silence "Checkpoint directory ... exists and is not empty" for ``dirpath`` when it holds
    no checkpoint yet: a logger writing its ``version_N/`` into the same folder fills it first,
    so the warning fires on a first run. With a ``.ckpt`` inside, the warning is real and stays."""
    path = Path(dirpath)
    if not any(path.glob("*.ckpt")):
        warnings.filterwarnings(
            "ignore",
            message=rf"Checkpoint directory {re.escape(str(path))} exists and is not empty",
        )
