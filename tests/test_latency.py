"""The latency protocol decodes as real beam search does."""

import dataclasses

import numpy as np
import torch

from automoe.latency import measure as m
from automoe.model import compiled
from automoe.model import moe as moe_module
from automoe.model.subnet import SubTransformer
from automoe.model.transformer import ModelArgs
from automoe.space import load_space


def test_protocol_spreads_beam_hypotheses_over_experts(monkeypatch, request):
    """Under the protocol the beam's hypotheses diverge as in real decoding, so a decoder MoE
    layer with 4 experts sees more than one expert at most steps (identical rows, as the
    old protocol decoded them, would all go to one expert at every step)."""
    space = load_space("small")
    big = space.largest()
    arch = dataclasses.replace(big, decoder_ffn=((1024, 512, 256, 256),) * big.decoder_layers, top_k=1)
    torch.manual_seed(0)
    model = SubTransformer(arch=arch, args=ModelArgs(vocab_size=300, qkv_dim=256, max_embed_dim=256)).eval()
    beam, steps = 5, 12
    experts_per_step: list[int] = []
    forward = moe_module.MoE.forward

    def recording(self, x, *args, **kwargs):
        out, stats = forward(self, x, *args, **kwargs)
        if stats is not None and x.shape[:2] == (beam, 1):  # a decoder step of the beam
            experts_per_step.append(int((stats.tokens_per_expert > 0).sum()))
        return out, stats

    monkeypatch.setattr(moe_module.MoE, "forward", recording)
    monkeypatch.setenv("AUTOMOE_DECODER", "off")  # the Python path, whose MoE layers can be watched
    compiled.reset()
    request.addfinalizer(compiled.reset)
    sources = torch.from_numpy(np.random.default_rng(0).integers(4, 300, (2, 30)))
    latency = m.measure(model, sources, beam=beam, steps=steps, warmup=0, repeats=2)
    assert latency.encoder_ms > 0 and latency.decoder_ms > 0
    per_layer_steps = arch.decoder_layers * steps * 2
    assert len(experts_per_step) == per_layer_steps  # exactly `steps` decoder steps per run
    later = np.array(experts_per_step).reshape(2, steps, arch.decoder_layers)[:, 1:]  # after the first step
    assert (later > 1).mean() > 0.5, experts_per_step


def test_models_are_timed_in_an_order_that_turns_around_every_run(monkeypatch):
    """measure_many alternates run by run and reverses the order each run (A B C C B A ...):
    no model always runs first, after the others' cache traffic."""
    calls: list[str] = []

    class Model:
        def __init__(self, name: str):
            self.name = name

        def parameters(self):
            yield torch.zeros(1)

        def encode(self, src):
            calls.append(self.name)

    monkeypatch.setattr(m, "for_inference", lambda model, precision: model)
    monkeypatch.setattr(m, "beam_search", lambda *a, **k: None)
    sources = torch.zeros(3, 30, dtype=torch.long)
    latencies = m.measure_many([Model("A"), Model("B"), Model("C")], sources, warmup=1, repeats=3)
    assert "".join(calls) == "ABC" + "CBA" + "ABC" + "CBA"
    assert len(latencies) == 3
