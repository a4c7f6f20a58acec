"""The one digest of the library: what a teacher, a data set or a file is.

:func:`tensor_digest` (SHA-256 over dtypes, shapes and bytes), :func:`module_digest` (the same
over a module's state dict: the identity of a teacher) and :func:`file_digest` are the only
digests of the library, so a teacher has one digest wherever it is recorded (teacher caches,
synthesised sets, start-up checks).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
from torch import nn


def file_digest(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def _update_with_tensor(digest: Any, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    if tensor.numel():
        digest.update(tensor.flatten().view(torch.uint8).numpy())


def tensor_digest(*tensors: torch.Tensor) -> str:
    """``sha256:<hex>`` over the dtypes, shapes and bytes of ``tensors``, in order."""
    digest = hashlib.sha256()
    for tensor in tensors:
        _update_with_tensor(digest, tensor)
    return "sha256:" + digest.hexdigest()


#: Key prefixes that wrappers add to the state dict of the network they hold: FrozenTeacher,
#: DataParallel and DistributedDataParallel (``module.``), ``torch.compile`` (``_orig_mod.``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _unwrapped_state(module: nn.Module) -> dict[str, Any]:
    state = module.state_dict()
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(name.startswith(prefix) for name in state):
                state = {name[len(prefix) :]: value for name, value in state.items()}
                stripped = True
    return state


def module_digest(module: nn.Module) -> str:
    """``sha256:<hex>`` identity of a network: its state dict (names, dtypes, shapes, bytes).

    Buffers count (BatchNorm statistics), so does the dtype (a bfloat16 copy is another
    teacher). A wrapper that only holds the network (``FrozenTeacher``, ``PretrainedTeacher``,
    ``DataParallel``, ``torch.compile``) has the network's digest: the prefix it adds to every
    key is removed first. The class is not part of the digest, so a teacher rebuilt from its
    checkpoint by another loader is still the same teacher.
    """
    digest = hashlib.sha256()
    for name, value in _unwrapped_state(module).items():
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            _update_with_tensor(digest, value)
        else:  # extra state of a module (rare): plain Python data
            digest.update(repr(value).encode())
    return "sha256:" + digest.hexdigest()
