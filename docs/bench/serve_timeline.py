"""Where bench.py serve's time goes while 8 clients are decoded together: bench.run_serve in this process with every
BatchDecoder chunk (CHECK_EVERY steps) timed, on the host (when the loop entered it) and on the GPU (an event after
its steps). If the GPU time of a chunk equals the host's, the host waits for the GPU and the step's kernels are
what to make faster; a GPU time per chunk above 8 bare steps would show the GPU waiting for the host.

    python docs/bench/serve_timeline.py [MODEL_DIR]     # from the repo root, on a CUDA GPU (random Phi-2, bf16)

It serves 1, 8, 1, 8, 1, 8 clients, so the spread between runs in one process shows too. Output of the 2026-11-30
H200 run: docs/bench/h200-serve-chunk-timeline-2026-11-30.log (from the session script this was made from, which also
marked admissions; this file has not run on a GPU itself).
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, ".")
import bench  # noqa: E402
import decoding  # noqa: E402

chunks = []  # (host time entering the chunk, rows in the shape, GPU event after the chunk)


def timed(decode_chunk):
    def chunk(self):
        entered = time.perf_counter()
        decode_chunk(self)
        done = torch.cuda.Event(enable_timing=True)
        done.record()
        chunks.append((entered, len(self.rows), done))
    return chunk


def report() -> None:
    """One line per stretch of chunks run in the 8-row shape (the warm-up's and each 8-client run's)."""
    torch.cuda.synchronize()
    i = 0
    while i < len(chunks):
        if chunks[i][1] != 8:
            i += 1
            continue
        j = i
        while j < len(chunks) and chunks[j][1] == 8:
            j += 1
        stretch = chunks[i:j]
        gpu = [a[2].elapsed_time(b[2]) for a, b in zip(stretch, stretch[1:])]
        host = [(b[0] - a[0]) * 1e3 for a, b in zip(stretch, stretch[1:])]
        print(f"PHASE chunks {len(stretch)}: GPU per chunk median {statistics.median(gpu):.2f} ms (min {min(gpu):.2f}, "
              f"max {max(gpu):.2f}); host per chunk median {statistics.median(host):.2f} ms; first-to-last chunk "
              f"end {stretch[0][2].elapsed_time(stretch[-1][2]):.1f} ms", flush=True)
        print("  GPU per chunk:", " ".join(f"{g:.1f}" for g in gpu), flush=True)
        i = j


def main() -> None:
    print("SPLIT_CONFIGS", decoding.SPLIT_CONFIGS, flush=True)
    decoding.BatchDecoder._decode_chunk = timed(decoding.BatchDecoder._decode_chunk)
    model = bench.make_random_phi2(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/phi2-random"))
    # bench.py serve's settings: ~60-token questions, 256 new tokens, greedy
    for r in bench.run_serve(model, "bf16", False, [1, 8, 1, 8, 1, 8], 40, 256):
        print("SERVE", r["name"], f"{r['aggregate_tok_s']:,.0f} tok/s", "first text", round(r["ttft_median_s"], 3),
              round(r["ttft_max_s"], 3), "admit", round(r["decoder"].get("admit_s", 0), 4), flush=True)
    report()


if __name__ == "__main__":  # the clients are spawned processes: they import this file and must not serve
    main()
