"""Speed of each backbone at 224: training and inference images per second, TFLite latency, size.

Prints figures; not a test. Run from the repository root:
    .venv/bin/python benchmarks/bench_backbones.py [--backbones efficientnet_lite0,resnet50] [--invocations 200] [--json FILE]
Weights are random for every backbone here (speed does not depend on them), so no download is needed.
Per-crop latencies are medians over --invocations single-crop calls; int8 and float TFLite are
measured in the same run so their ratio is meaningful on a shared, noisy machine. The device's whole
per-crop classification with the reference bundle (`--bundle`: its colour standardisation, the
int8 model, the calibrated softmax) is timed in the same run, beside the plain int8 Lite0 model.
`--json FILE` also writes the printed rows as one JSON object, keyed by backbone (read by
benchmarks/results_table.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from provenance import repo_path, write_result

REPO = Path(__file__).resolve().parents[1]


def real_crops(n: int, size: int) -> np.ndarray:
    from hematovision.crop import CropGeometry
    from hematovision.train.batches import crops_array
    from hematovision.train.datasets import load_bccd

    samples = load_bccd(REPO / "samples" / "bccd").samples
    crops = crops_array(samples, CropGeometry(input_size=size))
    return np.resize(crops, (n, size, size, 3))


def train_rate(model, x, y, steps: int) -> float:
    import keras

    model.compile(optimizer=keras.optimizers.Adam(1e-4),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    model.train_on_batch(x, y)  # build and trace
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return steps * len(x) / (time.perf_counter() - start)


def infer_rate(model, x, steps: int) -> float:
    model.predict_on_batch(x)
    start = time.perf_counter()
    for _ in range(steps):
        model.predict_on_batch(x)
    return steps * len(x) / (time.perf_counter() - start)


def keras_latency_ms(model, crop, n: int) -> float:
    model.predict_on_batch(crop[None].astype(np.float32))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        model.predict_on_batch(crop[None].astype(np.float32))
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def tflite_latency_ms(content: bytes, crop, threads: int, n: int) -> float:
    from hematovision.edge.vision.model_bundle import find_interpreter_class

    interp = find_interpreter_class()(model_content=content, num_threads=threads)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    scale, zero = inp["quantization"]
    x = crop[None].astype(np.float32)
    x = (np.round(x / scale) + zero).astype(inp["dtype"]) if scale else x.astype(inp["dtype"])
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def median_ms(call, n: int) -> float:
    call()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def bench_bundle(path: Path, crops: np.ndarray, plain: dict | None, args) -> dict:
    """A bundle's per-crop times: its int8 model alone (with the novelty feature output, when it has
    one) and the device's whole `classify_crops` (colour standardisation, model, calibrated softmax,
    novelty score), each with its ratio to the plain int8 Lite0 of the same run."""
    from hematovision.edge.vision.classify import classify_crops
    from hematovision.edge.vision.model_bundle import load_bundle

    out = {"bundle": repo_path(path)}
    for threads in (1, 2):
        bundle = load_bundle(path, threads)
        out[f"model_ms_{threads}t"] = median_ms(lambda: bundle.model.run(crops[:1]), args.invocations)
        out[f"device_ms_{threads}t"] = median_ms(lambda: classify_crops(bundle, crops[:1]), args.invocations)
        if plain:
            for kind in ("model", "device"):
                out[f"{kind}_ratio_to_plain_int8_{threads}t"] = out[f"{kind}_ms_{threads}t"] / plain[f"int8_ms_{threads}t"]
    out["feature_output"] = bundle.model.n_features > 0
    out["colour"] = bundle.colour.to_dict()
    return out


def float_tflite(model) -> bytes:
    import tempfile

    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        model.export(tmp + "/sm", format="tf_saved_model", verbose=False)
        return tf.lite.TFLiteConverter.from_saved_model(tmp + "/sm").convert()


def bench(name: str, crops: np.ndarray, args) -> dict:
    from hematovision.export.convert import convert_int8
    from hematovision.train.model import build_classifier, unfreeze_top

    model = build_classifier(name, None, 4, 224, 0.3)
    x = crops[:args.batch].astype(np.float32)
    y = np.eye(4, dtype=np.float32)[np.arange(len(x)) % 4]
    unfreeze_top(model, 0.3)
    out = {"backbone": name, "params_M": model.count_params() / 1e6,
           "train_img_s": train_rate(model, x, y, args.steps),
           "infer_img_s": infer_rate(model, x, args.steps)}
    out["keras_ms"] = keras_latency_ms(model, crops[0], args.invocations // 4)
    flt = float_tflite(model)
    q = convert_int8(model, crops[:args.calibration])
    out["float_tflite_MB"], out["int8_tflite_MB"] = len(flt) / 1e6, len(q) / 1e6
    for threads in (1, 2):
        out[f"float_ms_{threads}t"] = tflite_latency_ms(flt, crops[0], threads, args.invocations)
        out[f"int8_ms_{threads}t"] = tflite_latency_ms(q, crops[0], threads, args.invocations)
        out[f"int8_speedup_{threads}t"] = out[f"float_ms_{threads}t"] / out[f"int8_ms_{threads}t"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="efficientnet_b0,resnet50,efficientnet_lite0")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--invocations", type=int, default=200)
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "reference",
                        help="bundle whose whole per-crop device classification is timed (default models/reference)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE as one JSON object")
    args = parser.parse_args()
    crops = real_crops(max(args.batch, args.calibration), 224)
    print(f"machine: {os.cpu_count()} cores; batch {args.batch}; medians over {args.invocations} single-crop calls")
    rows = [bench(name, crops, args) for name in args.backbones.split(",")]
    keys = list(rows[0])
    print("\t".join(keys))
    for row in rows:
        print("\t".join(f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k]) for k in keys))
    device = bench_bundle(args.bundle, crops, next((r for r in rows if r["backbone"] == "efficientnet_lite0"), None), args)
    print("device per-crop classification: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in device.items()))
    if args.json:
        write_json(args.json, rows, device, args)
    return 0


def write_json(path: Path, rows: list[dict], device: dict, args) -> None:
    """The printed rows as one JSON object: the run's settings, {"backbones": {name: row}} and the
    bundle's per-crop device time ("device")."""
    result = {"machine_cores": os.cpu_count(), "batch": args.batch, "steps": args.steps,
              "invocations": args.invocations, "calibration": args.calibration, "weights": "random",
              "input_size": 224, "backbones": {row["backbone"]: row for row in rows}, "device": device}
    write_result(path, result)


if __name__ == "__main__":
    sys.exit(main())
