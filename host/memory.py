"""Peak training memory of a LoRA/QLoRA run, from a model's architecture numbers alone (no download).

peak = weights + LoRA parameters, gradients and AdamW states + activations + logits + framework overhead

- Weights: parameters × bytes of the dtype; 4-bit (NF4 with double quantization) is 4.127 bits per
  parameter, 8-bit 1 byte plus a scale per row; embeddings and lm_head stay 16-bit (bitsandbytes skips them).
- LoRA: r × (in + out) parameters per adapted matrix per layer, trained in float32: weight, gradient
  and AdamW's two moments, 16 bytes each.
- Activations, per token and layer (Korthikanti et al., 2022, "Reducing Activation Recomputation",
  with memory-efficient attention, so no sequence² term): what backward keeps of a block:
  its normed inputs, q/k/v and the attention output, the MLP's up/gate products and their activation.
  With gradient checkpointing only each layer's input is kept, plus the layer being recomputed and its
  gradients.
- Logits: batch × sequence × vocab, and at the loss four float32 buffers as large: the upcast copy, the
  log-softmax, and the gradients of both.
- Overhead: the CUDA context, cuBLAS workspaces and allocator slack on a GPU; on CPU the Python process
  with torch and transformers imported.

The constants are first-principles estimates; CALIBRATION_NOTE says what they have been checked against.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANT_BYTES = {"4bit": 4.127 / 8, "8bit": 1.0 + 2 / 4096}
LORA_BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq
GPU_OVERHEAD = 0.9 * GIB  # CUDA context (~0.5 GiB), cuBLAS/cuDNN workspaces
CPU_OVERHEAD = 363 * 2**20  # RSS of the CPU image's python after importing the training stack (measured)
ALLOCATOR_SLACK = 1.10  # fragmentation of the caching allocator on activations
CALIBRATION_NOTE = ("Checked against measured peaks on CPU (SmolLM2-135M, 24 settings, within 15%: "
                    "plans/calibration/); not yet against a GPU.")


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model (catalog entry or config.json)."""

    params: float
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool

    @classmethod
    def of(cls, entry) -> Shape:
        return cls(entry.params_m * 1e6, entry.layers, entry.hidden, entry.heads, entry.kv_heads, entry.attention_dim,
                   entry.intermediate, entry.vocab, entry.tied_embeddings)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def matrix(self, module: str) -> tuple[int, int] | None:
        """(in, out) features of a LoRA target module, by its usual name."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
            "o_proj": (q, self.hidden), "qkv_proj": (self.hidden, q + 2 * kv),
            "gate_proj": (self.hidden, self.intermediate), "up_proj": (self.hidden, self.intermediate),
            "gate_up_proj": (self.hidden, 2 * self.intermediate), "down_proj": (self.intermediate, self.hidden),
            "c_attn": (self.hidden, 3 * self.hidden), "c_proj": (self.hidden, self.hidden),
            "query_key_value": (self.hidden, q + 2 * kv), "dense": (q, self.hidden),
        }
        return shapes.get(module)


@dataclass(frozen=True)
class Breakdown:
    weights: float
    lora: float
    activations: float
    logits: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.activations + self.logits + self.overhead

    def rows(self) -> list[tuple[str, float]]:
        return [("weights", self.weights), ("LoRA params + grads + AdamW", self.lora),
                ("activations", self.activations), ("logits (fp32 loss)", self.logits),
                ("framework overhead", self.overhead), ("total", self.total)]


def lora_params(shape: Shape, targets: list[str], rank: int) -> int:
    per_layer = sum(rank * (m[0] + m[1]) for name in targets if (m := shape.matrix(name)))
    return shape.layers * per_layer


def activation_bytes_per_token_layer(shape: Shape, dtype_bytes: int) -> float:
    """Tensors a decoder block keeps for backward, per token (memory-efficient attention, transformers' code):
    attention: the block input and its norm; q after RoPE; k and v expanded to every query head (repeat_kv)
    as SDPA gets them; SDPA's output and the contiguous copy o_proj reads. MLP: input and norm; gate, its
    SiLU, up, and their product (down_proj's input)."""
    q = shape.heads * shape.head_dim
    attention = 2 * shape.hidden + 5 * q
    mlp = 2 * shape.hidden + 4 * shape.intermediate
    return dtype_bytes * (attention + mlp) + shape.hidden  # + dropout/residual masks (1 byte)


def estimate(shape: Shape, *, dtype: str, quantization: str, targets: list[str], rank: int, seq_len: int,
             micro_batch: int, checkpointing: bool, accelerator: str) -> Breakdown:
    dtype_bytes = DTYPE_BYTES[dtype]
    if quantization == "none":
        weights = shape.params * dtype_bytes
    else:
        embeddings = shape.embedding_params
        weights = (shape.params - embeddings) * QUANT_BYTES[quantization] + embeddings * 2
    lora = lora_params(shape, targets, rank) * LORA_BYTES_PER_PARAM
    tokens = micro_batch * seq_len
    per_layer = activation_bytes_per_token_layer(shape, dtype_bytes) * tokens
    if checkpointing:  # each layer's input kept; the layer being recomputed and its gradients alive
        activations = shape.layers * tokens * shape.hidden * dtype_bytes + 2 * per_layer
    else:
        activations = shape.layers * per_layer
    activations *= ALLOCATOR_SLACK
    logits = tokens * shape.vocab * (dtype_bytes + 4 * 4)  # logits; fp32 copy, log-softmax and two gradients
    overhead = GPU_OVERHEAD if accelerator == "cuda" else CPU_OVERHEAD
    return Breakdown(weights, lora, activations, logits, overhead)
