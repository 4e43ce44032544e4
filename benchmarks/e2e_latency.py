"""End-to-end latency: Orthanc pushes a 24-slice MR series to `triaged serve`; time until the last SC is in Orthanc.

Run from the repository root:  .venv/bin/python -m benchmarks.e2e_latency [--runs 5] [--quiet 2] [--model DIR]
[--precision fp32|auto] [--backend auto|torch|openvino|onnxruntime]

Each run is a new study (a synthetic phantom with a lesion, built by triaged), uploaded to Orthanc first;
the clock starts at the `/modalities/triaged/store` call and stops when every Secondary Capture of that
series has been confirmed stored by Orthanc (the daemon's `outputs.sent_at`, checked against Orthanc's
index). The quiet period (series completion wait) is part of the latency by design. Prints the median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import select

from tests.support.orthanc import Orthanc
from tests.support.triaged_daemon import TriagedDaemon
from triaged.config import DEFAULT_MODEL_DIR
from triaged.db.models import Output, OutputKind, Result, Series, Study
from triaged.demo_phantom import phantom_series
from triaged.dicom.synthetic import write_mr_series


def _sc_rows(daemon: TriagedDaemon, study_uid: str) -> list[Output]:
    with daemon.session_factory() as session:
        rows = list(
            session.scalars(
                select(Output)
                .join(Result, Result.id == Output.result_id)
                .join(Series, Series.id == Result.series_id)
                .join(Study, Study.id == Series.study_id)
                .where(Study.study_instance_uid == study_uid, Output.kind == OutputKind.SECONDARY_CAPTURE)
            )
        )
        for row in rows:
            session.expunge(row)
        return rows


def _one_run(orthanc: Orthanc, daemon: TriagedDaemon, work: Path, index: int, slices: int) -> dict[str, float]:
    paths = write_mr_series(
        phantom_series(slices, lesion=True, seed=index), work / f"run{index}", seed=f"bench-{time.time_ns()}"
    )
    series_ids = {orthanc.post("/instances", p.read_bytes())["ParentSeries"] for p in paths}
    [series_id] = series_ids
    study_uid = orthanc.get(f"/studies/{orthanc.get(f'/series/{series_id}')['ParentStudy']}")["MainDicomTags"][
        "StudyInstanceUID"
    ]
    started = time.perf_counter()
    orthanc.push("triaged", [series_id])
    pushed = time.perf_counter() - started
    deadline = started + 300
    while time.perf_counter() < deadline:
        rows = _sc_rows(daemon, study_uid)
        if rows and all(row.sent_at is not None for row in rows):
            break
        time.sleep(0.05)
    else:
        raise TimeoutError(f"run {index}: SCs not stored within 300 s\n{daemon.log_tail()}")
    latency = time.perf_counter() - started
    for row in rows:  # confirm Orthanc really has them (outside the timed part)
        found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": row.sop_instance_uid}})
        if len(found) != 1:
            raise AssertionError(f"run {index}: SC {row.sop_instance_uid} not in Orthanc")
    return {"latency_s": latency, "push_s": pushed, "secondary_captures": float(len(rows))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--quiet", type=float, default=2.0, help="series.quiet_seconds")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--precision", default="fp32", help="model.precision (fp32: as the tests run the daemon)")
    parser.add_argument("--backend", default="auto", help="model.backend")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="triaged-bench-") as tmp:
        work = Path(tmp)
        orthanc = Orthanc(root=work / "orthanc", modalities={})
        daemon = TriagedDaemon(
            root=work / "triaged",
            model_dir=args.model,
            peers={"orthanc": {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}},
            outputs={"destination": "orthanc", "key_object_selection": True, "structured_report": True},
            quiet_seconds=args.quiet,
            worker={"poll_seconds": 0.05},
            model={"precision": args.precision, "backend": args.backend},
        )
        orthanc.modalities = {"triaged": ("TRIAGED", daemon.dicom_port)}
        orthanc.start()
        try:
            daemon.start(timeout=240)
            try:
                runs = [_one_run(orthanc, daemon, work, i, args.slices) for i in range(args.runs)]
            finally:
                daemon.stop()
        finally:
            orthanc.stop()
    latencies = [r["latency_s"] for r in runs]
    summary = {
        "runs": len(runs),
        "slices": args.slices,
        "quiet_seconds": args.quiet,
        "model": str(args.model),
        "precision": args.precision,
        "backend": args.backend,
        "median_latency_s": statistics.median(latencies),
        "min_latency_s": min(latencies),
        "max_latency_s": max(latencies),
        "median_push_s": statistics.median(r["push_s"] for r in runs),
        "secondary_captures_per_run": runs[0]["secondary_captures"],
        "target_s": 4.0,
    }
    if args.json:
        print(json.dumps({"summary": summary, "runs": runs}, indent=2))
    else:
        for i, run in enumerate(runs, 1):
            print(f"run {i}: push {run['push_s']:.2f} s, push→last SC in Orthanc {run['latency_s']:.2f} s")
        print(
            f"median {summary['median_latency_s']:.2f} s (min {summary['min_latency_s']:.2f}, max "
            f"{summary['max_latency_s']:.2f}) for {args.slices} slices, quiet period {args.quiet:g} s; target ≤ 4 s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
