"""The shape of a transformer as the planner, the gather replays and the dry run see it: sizes only, no weights."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    family: str  # "opt": fc1/fc2 MLP with biases; "llama": gated MLP, no biases, RMSNorm
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    kv_heads: int = 0  # 0: same as heads
    proj_dim: int = 0  # OPT word_embed_proj_dim when it differs from hidden (opt-350m)
    tied_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_params(self) -> int:
        """Parameters of one decoder layer."""
        h, f = self.hidden, self.ffn
        kv = (self.kv_heads or self.heads) * self.head_dim
        if self.family == "opt":
            return 4 * (h * h + h) + (h * f + f) + (f * h + h) + 4 * h  # q,k,v,o; fc1; fc2; 2 LayerNorms
        return 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h  # q,o; k,v; gate,up,down; 2 RMSNorms

    def layer_modules(self) -> list[int]:
        """Parameters of each leaf module of one layer (what ZeRO-3 gathers at a time)."""
        h, f = self.hidden, self.ffn
        kv = (self.kv_heads or self.heads) * self.head_dim
        if self.family == "opt":
            return [h * h + h] * 4 + [h * f + f, f * h + h, 2 * h, 2 * h]
        return [h * h, h * kv, h * kv, h * h, h * f, h * f, f * h, h, h]

    def outer_modules(self) -> list[int]:
        """Parameters outside the layers, module by module: embeddings, projections, final norm, head."""
        h, v = self.hidden, self.vocab
        if self.family == "opt":
            p = self.proj_dim or h
            mods = [v * p, (self.max_positions + 2) * h]  # OPT's learned positions have an offset of 2
            if p != h:
                mods += [h * p, p * h]  # project_in / project_out
            else:
                mods.append(2 * h)  # final LayerNorm (opt-350m has none)
        else:
            mods = [v * h, h]  # embeddings, final RMSNorm
        if not self.tied_embeddings:
            mods.append(v * h)
        return mods

    def param_count(self) -> int:
        return self.layers * self.layer_params() + sum(self.outer_modules())

    def matrices(self) -> tuple[list[tuple[int, int]], int]:
        """The (rows, cols) of every weight matrix, and the number of elements in 1-D tensors."""
        h, f, v = self.hidden, self.ffn, self.vocab
        kv = (self.kv_heads or self.heads) * self.head_dim
        if self.family == "opt":
            layer, layer_vec = [(h, h)] * 4 + [(f, h), (h, f)], 4 * h + f + h + 4 * h
            p = self.proj_dim or h
            outer, outer_vec = [(v, p), (self.max_positions + 2, h)], 0
            if p != h:
                outer += [(h, p), (p, h)]
            else:
                outer_vec = 2 * h
        else:
            layer, layer_vec = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)], 2 * h
            outer, outer_vec = [(v, h)], h
        if not self.tied_embeddings:
            outer.append((v, h))
        return layer * self.layers + outer, layer_vec * self.layers + outer_vec
