"""CTranslate2 timing worker for bench/ct2_latency.py: imports ctranslate2, never torch.

Reads one JSON command per stdin line ({"run": n} or {"quit": true}); answers with the
seconds of each of n timed translate_batch calls. The model folder, source pieces and
decode settings (and the compute type: default, int8) come on the command line.
"""

from __future__ import annotations

import json
import sys
import time

import ctranslate2


def main() -> None:
    model, threads, request = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    compute_type = sys.argv[4] if len(sys.argv) > 4 else "default"  # int8: quantized when loaded
    assert "torch" not in sys.modules
    translator = ctranslate2.Translator(
        model, device="cpu", inter_threads=1, intra_threads=threads, compute_type=compute_type
    )
    sources, opts = request["sources"], request["options"]
    lengths = []
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        times = []
        for _ in range(cmd["run"]):
            t0 = time.perf_counter()
            out = translator.translate_batch(sources, **opts)
            times.append(time.perf_counter() - t0)
            lengths = [len(r.hypotheses[0]) for r in out]
        print(json.dumps({"times": times, "lengths": lengths}), flush=True)


if __name__ == "__main__":
    main()
