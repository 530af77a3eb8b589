"""A bundle folder on disk: written atomically and stamped, or re-stamped after a checked edit.

No TensorFlow here: `hematovision-train adapt` writes bundles with it where only the device's
libraries are installed."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from hematovision.edge.vision.bundle_meta import stamped
from hematovision.edge.vision.model_bundle import META_FILE, MODEL_FILE, load_bundle, read_meta

logger = logging.getLogger(__name__)


def write_bundle(out_dir: Path, tflite: bytes, meta: dict, extra: dict[str, bytes] | None = None) -> dict:
    """Write the bundle folder atomically: a complete new folder replaces the old one, or nothing.

    bundle.json is stamped (meta_sha256 over every other key), so the device refuses a copy that
    was edited or damaged afterwards; `extra` files (the novelty arrays) are named and hashed in
    it. Returns the stamped bundle.json.
    """
    meta = stamped(meta)
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is read by the service user
    for name, data in ((MODEL_FILE, tflite), *(extra or {}).items(), (META_FILE, json.dumps(meta, indent=2).encode())):
        with open(tmp / name, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    old = out_dir.with_name(out_dir.name + ".previous")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return meta


def restamp_bundle(bundle_dir: Path) -> dict:
    """Stamp an existing bundle's bundle.json anew after a deliberate, checked edit (or one made
    before stamps existed): every field is checked and the model loaded against it first.

    Raises ModelInvalid, as the device's loader does, naming what is wrong; nothing is written then.
    """
    bundle_dir = Path(bundle_dir)
    load_bundle(bundle_dir, threads=1, stamp=False)
    meta = stamped(read_meta(bundle_dir / META_FILE))
    target = bundle_dir / META_FILE
    tmp = target.with_name(f".{META_FILE}.restamp.tmp")
    with open(tmp, "wb") as handle:
        handle.write(json.dumps(meta, indent=2).encode())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    logger.info("%s stamped: meta_sha256 %s", target, meta["meta_sha256"])
    return meta
