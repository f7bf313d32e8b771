"""Token-budget micro-batches for RL rows: packed sequences, shared prompts, scored positions only.

A micro-batch is one unpadded row of tokens made of *segments*. A segment is a prompt followed
by one or more of its completions laid end to end, ``[p, c1, c2, ..., cG]``. Each completion's
positions continue from the prompt's (``P, P+1, ...``), and `segment_attention` lets a
completion's tokens attend to the prompt and to their own completion only, so completion i is
scored exactly as the row ``[p, ci]`` would be, while the prompt is encoded once for all of them
(shared-prompt training; gradients from every completion flow back into the one copy of the
prompt). Attention is computed per segment, never over the whole packed row, so packing costs no
quadratic attention over unrelated tokens.

Only the positions whose next token is scored go through ``lm_head``: `MicroBatch.score_pos_N`
indexes the hidden states, so no ``[B, L, V]`` logits tensor is ever built.

SFT's rows, whole sequences right-padded or packed with restarting positions, are built here
too (`collate`, `collate_packed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rlkd.losses import selective_log_softmax

if TYPE_CHECKING:
    from rlkd.types import TrainBatch

SEGMENT_ATTENTION = "rlkd_segments"


@dataclass(frozen=True)
class Segment:
    prompt: tuple[int, int]  # (start, length) in the packed row
    completions: tuple[tuple[int, int], ...]  # (start, length) of each completion


@dataclass
class MicroBatch:
    rows: list[int]  # batch rows scored here; row b of the [B, T] outputs is rows[b]
    input_ids_1L: torch.Tensor
    position_ids_1L: torch.Tensor
    segments: list[Segment]
    score_pos_N: torch.Tensor  # hidden-state positions whose next token is target n
    target_ids_N: torch.Tensor
    row_N: torch.Tensor  # target n is token col_N[n] of completion rows[row_N[n]]
    col_N: torch.Tensor
    width: int  # T: the longest completion

    def to_BT(self, values_N: torch.Tensor) -> torch.Tensor:
        """Scatter per-target values into a zero-filled [B, T] completion-aligned tensor."""
        out_BT = values_N.new_zeros(len(self.rows), self.width)
        return out_BT.index_put((self.row_N.to(out_BT.device), self.col_N.to(out_BT.device)), values_N)

    def mask_BT(self) -> torch.Tensor:
        return self.to_BT(torch.ones(len(self.target_ids_N)))


def plan_micro_batches(prompt_ids: list[list[int]], completion_ids: list[list[int]], rows: list[int],
                       max_tokens: int, share_prompts: bool) -> list[list[list[int]]]:
    """Group `rows` into micro-batches of at most `max_tokens` input tokens.

    Returns micro-batches, each a list of units; a unit is a list of rows that share one encoded
    prompt (a single row when `share_prompts` is off). Rows with empty completions have no target
    and are left out. A group too long for the budget is split into several units with their own
    copy of the prompt; a single sequence longer than the budget gets a micro-batch of its own.
    Units are packed first-fit-decreasing, which only changes the order in which gradients add up.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for r in rows:
        if completion_ids[r]:
            key = tuple(prompt_ids[r]) if share_prompts else (r,)
            groups.setdefault(key, []).append(r)
    units: list[tuple[int, list[int]]] = []  # (tokens, rows)
    for members in groups.values():
        p_len = len(prompt_ids[members[0]])
        cur, cost = [], p_len
        for r in members:
            if cur and cost + len(completion_ids[r]) > max_tokens:
                units.append((cost, cur))
                cur, cost = [], p_len
            cur.append(r)
            cost += len(completion_ids[r])
        units.append((cost, cur))
    bins: list[list[list[int]]] = []
    room: list[int] = []
    for cost, unit in sorted(units, key=lambda u: -u[0]):
        slot = next((b for b, free in enumerate(room) if free >= cost), None)
        if slot is None:
            bins.append([])
            room.append(max_tokens)
            slot = len(bins) - 1
        bins[slot].append(unit)
        room[slot] -= cost
    return bins


def build_micro_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]],
                      units: list[list[int]]) -> MicroBatch:
    """Lay out one planned micro-batch (see `plan_micro_batches`) as a packed row."""
    ids, pos, segments, score_pos, targets, row_n, col_n = [], [], [], [], [], [], []
    rows = [r for unit in units for r in unit]
    b = 0
    for unit in units:
        prompt = prompt_ids[unit[0]]
        p_start, p_len = len(ids), len(prompt)
        ids += prompt
        pos += range(p_len)
        spans = []
        for r in unit:
            comp = completion_ids[r]
            c_start = len(ids)
            spans.append((c_start, len(comp)))
            ids += comp
            pos += range(p_len, p_len + len(comp))
            # Token j of the completion is predicted by the hidden state one step before it: the
            # prompt's last token for j = 0, the completion's token j - 1 after that.
            score_pos += [p_start + p_len - 1] + list(range(c_start, c_start + len(comp) - 1))
            targets += comp
            row_n += [b] * len(comp)
            col_n += range(len(comp))
            b += 1
        segments.append(Segment((p_start, p_len), tuple(spans)))
    return MicroBatch(
        rows=rows,
        input_ids_1L=torch.tensor([ids], dtype=torch.long),
        position_ids_1L=torch.tensor([pos], dtype=torch.long),
        segments=segments,
        score_pos_N=torch.tensor(score_pos, dtype=torch.long),
        target_ids_N=torch.tensor(targets, dtype=torch.long),
        row_N=torch.tensor(row_n, dtype=torch.long),
        col_N=torch.tensor(col_n, dtype=torch.long),
        width=max(len(completion_ids[r]) for r in rows),
    )


def segment_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      segments: list[Segment] | None = None, **kwargs):
    """Attention over a packed row of segments (transformers' attention-function signature).

    query [1, H, L, D], key/value [1, Hkv, L, D] -> ([1, L, H, D], None). Per segment: the prompt
    attends causally to itself; completion i's token j attends to the whole prompt and to tokens
    0..j of completion i. Without `segments` (SFT, evaluation) this is plain SDPA.
    """
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    q, k, v = query[0], key[0], value[0]
    pieces = []
    for seg in segments:
        s, p_len = seg.prompt
        k_p, v_p = k[:, s:s + p_len], v[:, s:s + p_len]
        pieces.append(F.scaled_dot_product_attention(
            q[None, :, s:s + p_len], k_p[None], v_p[None], is_causal=True, dropout_p=dropout,
            scale=scaling, enable_gqa=True)[0])
        lens = [n for _, n in seg.completions]
        width, G = max(lens), len(lens)

        def padded(x, start, n, width=width):
            return F.pad(x[:, start:start + n], (0, 0, 0, width - n))

        q_c = torch.stack([padded(q, c0, n) for c0, n in seg.completions])
        k_c = torch.cat([k_p.expand(G, *k_p.shape), torch.stack([padded(k, c0, n) for c0, n in seg.completions])], 2)
        v_c = torch.cat([v_p.expand(G, *v_p.shape), torch.stack([padded(v, c0, n) for c0, n in seg.completions])], 2)
        j = torch.arange(width, device=q.device)
        own_GCC = (j[None, None, :] <= j[None, :, None]) & (j[None, None, :] < torch.tensor(lens, device=q.device)[:, None, None])
        mask_G1CK = torch.cat([own_GCC.new_ones(G, width, p_len), own_GCC], 2)[:, None]
        out_c = F.scaled_dot_product_attention(q_c, k_c, v_c, attn_mask=mask_G1CK, dropout_p=dropout,
                                               scale=scaling, enable_gqa=True)
        pieces += [out_c[g, :, :n] for g, n in enumerate(lens)]
    # Segments tile the row in order with no padding, so the pieces concatenate to length L.
    return torch.cat(pieces, 1)[None].transpose(1, 2).contiguous(), None


def enable_segment_attention(model) -> None:
    """Route `model`'s attention through `segment_attention` (plain SDPA unless segments are
    passed). Not saved with checkpoints: transformers does not serialise the implementation."""
    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)
    model.set_attn_implementation(SEGMENT_ATTENTION)


def micro_batch_logits(model, mb: MicroBatch, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """Next-token logits at the N scored positions of `mb`: [N, V] (lm_head's dtype).

    The decoder runs over the packed row (under bf16 autocast when asked) and only the N scored
    hidden states go through lm_head, so no [B, L, V] tensor is built.
    """
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with autocast:
        hidden_1LH = model.get_decoder()(
            input_ids=mb.input_ids_1L.to(device), position_ids=mb.position_ids_1L.to(device),
            use_cache=False, segments=mb.segments).last_hidden_state
        return model.get_output_embeddings()(hidden_1LH[0].index_select(0, mb.score_pos_N.to(device)))


def score_micro_batch(model, mb: MicroBatch, temperature: float,
                      autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """Logprobs of every scored target of `mb` under `model`: [N], fp32, the temperature and
    log-softmax applied in fp32 (`micro_batch_logits`)."""
    logits_NV = micro_batch_logits(model, mb, autocast_dtype)
    return selective_log_softmax(logits_NV, mb.target_ids_N.to(logits_NV.device), temperature=temperature)


# ---- SFT rows (padded or packed whole sequences) -----------------------------------------


def _pad(rows: list[list], value, dtype) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=dtype)


def collate(batch: TrainBatch) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion rows; `*_BT` tensors are aligned to the shifted targets,
    so position t holds the logprob of token t+1 and mask_BT marks completion targets."""
    seqs = [p + c for p, c in zip(batch.prompt_ids, batch.completion_ids, strict=True)]
    input_ids_BL = _pad(seqs, 0, torch.long)
    attn_BL = _pad([[1] * len(s) for s in seqs], 0, torch.long)
    mask_rows, lp_rows = [], []
    for p, c, lp in zip(batch.prompt_ids, batch.completion_ids, batch.rollout_logprobs, strict=True):
        mask_rows.append([0] * (len(p) - 1) + [1] * len(c))
        lp_rows.append([0.0] * (len(p) - 1) + list(lp))
    return {
        "input_ids_BL": input_ids_BL,
        "attn_BL": attn_BL,
        "mask_BT": _pad(mask_rows, 0, torch.float32),
        "rollout_logprobs_BT": _pad(lp_rows, 0.0, torch.float32),
        "advantages_B": torch.tensor(batch.advantages, dtype=torch.float32),
    }


def collate_packed(batch: TrainBatch, row_len: int) -> dict[str, torch.Tensor]:
    """Sequences packed first-fit-decreasing into rows of at most `row_len` tokens.

    position_ids restart at 0 for each sequence and no attention mask is passed, so transformers
    builds a block-diagonal causal mask: a token never attends to another sequence in its row.
    """
    seqs = [p + c for p, c in zip(batch.prompt_ids, batch.completion_ids, strict=True)]
    rows: list[list[int]] = []  # sequence indices per row
    room: list[int] = []
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i])):
        if len(seqs[i]) > row_len:
            raise ValueError(f"sequence of {len(seqs[i])} tokens does not fit a packed row of {row_len}")
        slot = next((r for r, free in enumerate(room) if free >= len(seqs[i])), None)
        if slot is None:
            rows.append([])
            room.append(row_len)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= len(seqs[i])
    ids, pos, mask = [], [], []
    for members in rows:
        r_ids, r_pos, r_mask = [], [], []
        for i in members:
            p_len, c_len = len(batch.prompt_ids[i]), len(batch.completion_ids[i])
            r_ids += seqs[i]
            r_pos += list(range(p_len + c_len))
            # Targets are shifted: position t predicts t+1, and a sequence's last token would
            # predict the next sequence's first, so it is masked.
            r_mask += [0] * (p_len - 1) + [1] * c_len + [0]
        ids.append(r_ids)
        pos.append(r_pos)
        mask.append(r_mask[:-1])
    width = max(len(r) for r in ids)
    # Padding gets its own position run (0, 1, ...) so it forms a block of its own.
    pos = [r + list(range(width - len(r))) for r in pos]
    return {
        "input_ids_BL": _pad(ids, 0, torch.long),
        "position_ids_BL": torch.tensor(pos, dtype=torch.long),
        "mask_BT": _pad(mask, 0, torch.float32)[:, : width - 1],
    }
