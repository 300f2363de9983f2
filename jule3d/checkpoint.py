"""Files of Phase 1: trained networks (:func:`save_model` / :func:`load_model`) and training checkpoints.

Every file holds only tensors and plain containers, so it loads with ``torch.load(weights_only=True)``, and
is written to a temporary file renamed into place, so an interrupted write leaves no half-written file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from jule3d.models import JuleNet3D, NetConfig

__all__ = ["CHECKPOINT_NAME", "load_checkpoint", "load_model", "read_checked", "save_model", "write_atomic"]

CHECKPOINT_NAME = "jule_checkpoint.pt"
"""File name of the checkpoint inside ``checkpoint_dir``."""

CHECKPOINT_FORMAT = "jule3d-jule-checkpoint-v1"
_MODEL_FORMAT = "jule3d-model-v1"


def write_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the target folder, then rename it over ``path``.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import torch
    >>> from jule3d.checkpoint import write_atomic
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = Path(tmp) / "obj.pt"
    ...     write_atomic({"x": torch.arange(3)}, path)
    ...     torch.load(path, weights_only=True)["x"].tolist(), sorted(p.name for p in Path(tmp).iterdir())
    ([0, 1, 2], ['obj.pt'])
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checked(path: Path, expected_format: str, required: tuple[str, ...]) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with errors turned into ``ValueError`` naming the file.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from jule3d.checkpoint import read_checked, write_atomic
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = Path(tmp) / "obj.pt"
    ...     write_atomic({"format": "demo-v1", "value": 3}, path)
    ...     print(read_checked(path, "demo-v1", ("value",))["value"])
    ...     try:
    ...         read_checked(path, "demo-v1", ("value", "other"))
    ...     except ValueError as exc:
    ...         print(str(exc).endswith("missing entries ['other']"))
    3
    True
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        raise ValueError(f"{path} is corrupt or not a jule3d file: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("format") != expected_format:
        raise ValueError(f"{path} is not a {expected_format} file")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ValueError(f"{path} is corrupt: missing entries {missing}")
    return obj


def _describe_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    problems = []
    saved_cfg, cur_cfg = saved.get("config", {}), current["config"]
    for key in sorted(set(saved_cfg) | set(cur_cfg)):
        if saved_cfg.get(key) != cur_cfg.get(key):
            problems.append(f"config.{key}: checkpoint {saved_cfg.get(key)!r}, now {cur_cfg.get(key)!r}")
    if list(saved.get("patch_shape", [])) != current["patch_shape"]:
        problems.append(f"patch shape: checkpoint {saved.get('patch_shape')}, now {current['patch_shape']}")
    elif saved.get("patch_hash") != current["patch_hash"]:
        problems.append("patch contents differ (same shape, different values)")
    return problems


def load_checkpoint(path: Path, fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint of :func:`jule3d.jule.train_jule`, refused when it was written for another configuration
    or patch set (the message lists the differences).

    Examples
    --------
    A hand-made checkpoint; :func:`jule3d.jule.train_jule` writes real ones to ``checkpoint_dir``:

    >>> import tempfile
    >>> from pathlib import Path
    >>> from jule3d.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_NAME, load_checkpoint, write_atomic
    >>> fingerprint = {"config": {"k_s": 3}, "patch_shape": [40, 1, 9, 9, 9], "patch_hash": "abc"}
    >>> ckpt = {"format": CHECKPOINT_FORMAT, "trainer": {}, "labels": None, "history": [], "period": 1,
    ...         "stage": "merged", "fingerprint": fingerprint}
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = Path(tmp) / CHECKPOINT_NAME
    ...     write_atomic(ckpt, path)
    ...     print(load_checkpoint(path, fingerprint)["period"])
    ...     try:
    ...         load_checkpoint(path, {**fingerprint, "config": {"k_s": 5}})
    ...     except ValueError as exc:
    ...         print(str(exc).split(": ", 1)[1])
    1
    config.k_s: checkpoint 3, now 5
    """
    ckpt = read_checked(
        path,
        CHECKPOINT_FORMAT,
        ("trainer", "labels", "history", "period", "stage", "fingerprint"),
    )
    problems = _describe_mismatch(ckpt["fingerprint"], fingerprint)
    if problems:
        raise ValueError(
            f"checkpoint {path} was written for another configuration or patch set: " + "; ".join(problems)
        )
    return ckpt


def save_model(
    result_or_model: Any, path: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write a trained network (its :class:`~jule3d.models.NetConfig` and weights) to ``path``.

    Parameters
    ----------
    result_or_model : JuleResult or JuleNet3D
    path : path
        Target file (conventionally ``.pt``); written to a temporary file and renamed.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is false.
    ValueError
        If the first argument is neither a result nor a model.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from jule3d.checkpoint import save_model
    >>> from jule3d.models import JuleNet3D, net_config
    >>> model = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=0)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     print(save_model(model, Path(tmp) / "net.pt").name)
    ...     try:
    ...         save_model(model, Path(tmp) / "net.pt")
    ...     except FileExistsError:
    ...         print("exists")
    net.pt
    exists
    """
    model = getattr(result_or_model, "model", result_or_model)  # a JuleResult or the network itself
    if not isinstance(model, JuleNet3D):
        raise ValueError(f"result_or_model must be a JuleResult or JuleNet3D, got {type(result_or_model).__name__}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} of path does not exist")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_atomic({"format": _MODEL_FORMAT, "net_config": model.config.to_dict(), "state_dict": state}, path)
    return path


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> JuleNet3D:
    """Read a network written by :func:`save_model` (``torch.load(weights_only=True)``).

    Parameters
    ----------
    path : path
    device : str or torch.device
        Where to put the model.

    Returns
    -------
    JuleNet3D
        In eval mode.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is corrupt or not a jule3d model.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import torch
    >>> from jule3d.checkpoint import load_model, save_model
    >>> from jule3d.models import JuleNet3D, net_config
    >>> model = JuleNet3D(net_config("fast", patch_size=13, n_filters=4, feature_dim=8), seed=0).eval()
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     loaded = load_model(save_model(model, Path(tmp) / "net.pt"))
    >>> loaded.config == model.config, loaded.training
    (True, False)
    >>> x = torch.zeros(2, 1, 13, 13, 13)
    >>> bool(torch.equal(loaded(x), model(x)))
    True
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    obj = read_checked(path, _MODEL_FORMAT, ("net_config", "state_dict"))
    try:
        model = JuleNet3D(NetConfig.from_dict(obj["net_config"]))
        model.load_state_dict(obj["state_dict"])
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"{path} is corrupt: {exc}") from exc
    return model.to(device).eval()
