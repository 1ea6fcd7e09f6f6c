"""Model FLOPs of a decoder's training and scoring work, and the machine's float32 matmul rate.

For model FLOPs utilisation (MFU): achieved model FLOP/s over the measured matmul peak.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .modeling import _vocab_size


@dataclass
class FlopCount:
    """Model FLOPs (2 per multiply-add) of the work a method needs; the convention:

    forward  = every block's linear layers at every token + causal attention (QK^T and PV over
               the L(L+1)/2 query-key pairs) + the output layer at the supervised positions only;
    training = forward + backward through the activations of the blocks from the lowest adapted
               one up (2x forward for attention) + the LoRA layers (forward, input and weight
               gradients) + the output layer's input gradient at the supervised positions.
    A frozen base needs no weight gradients. Padding and full-vocabulary logits at positions no
    loss uses are not counted: that is waste, not model work.
    """

    block_macs: list  # per block: multiply-adds per token of its linear layers
    attn_dims: list  # per block: n_heads * head_dim
    head_macs: int  # hidden * vocab
    lora_macs: list | None = None  # per block: rank * (in + out) over its adapted linears

    @classmethod
    def of(cls, model) -> "FlopCount":
        blocks, attn = [], []
        for layer in model.layers:
            macs = 0
            for _, m in layer.named_modules():
                if isinstance(m, nn.QuantizedLinear):
                    macs += m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
                elif isinstance(m, nn.Linear):
                    macs += m.weight.shape[0] * m.weight.shape[1]
            blocks.append(macs)
            attn.append(layer.self_attn.q_proj.weight.shape[0])
        hidden = model.model.embed_tokens.weight.shape[1]
        if isinstance(model.model.embed_tokens, nn.QuantizedEmbedding):
            hidden = hidden * 32 // model.model.embed_tokens.bits
        return cls(blocks, attn, hidden * _vocab_size(model))

    def with_lora(self, model) -> "FlopCount":
        lora = []
        for layer in model.layers:
            lora.append(sum(m.lora_a.shape[1] * (m.lora_a.shape[0] + m.lora_b.shape[1])
                            for _, m in layer.named_modules() if hasattr(m, "lora_a")))
        return FlopCount(self.block_macs, self.attn_dims, self.head_macs, lora)

    def forward(self, L: int, K: int) -> float:
        """One sequence of L positions, K of them supervised."""
        return sum(2 * m * L + 2 * a * L * (L + 1) for m, a in zip(self.block_macs, self.attn_dims)) \
            + 2 * self.head_macs * K

    def train(self, L: int, K: int) -> float:
        lora = self.lora_macs or [0] * len(self.block_macs)
        first = next((i for i, r in enumerate(lora) if r), len(lora))
        back = sum(2 * m * L + 4 * a * L * (L + 1) for m, a in zip(self.block_macs[first:], self.attn_dims[first:]))
        return self.forward(L, K) + back + sum(6 * r * L for r in lora) + 2 * self.head_macs * K


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Best float32 n x n matmul rate on the default device, FLOP/s."""
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b)
    for _ in range(3):
        mx.eval(a @ b)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(a @ b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best
