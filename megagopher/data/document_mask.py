"""Document masking of packed sequences, with Megatron-LM's meaning of its three flags.

A training sample is seq_length + 1 tokens cut from a stream of documents, each ended by the
end-of-document token (eod), so one sample usually holds the end of one document and the start of others.
Megatron's ``get_ltor_masks_and_position_ids`` decides, from the input tokens of a micro-batch:

    reset_position_ids    positions restart at 0 on the token after each eod;
    reset_attention_mask  no token attends to a token of an earlier document (the eod belongs to the
                          document it ends);
    eod_mask_loss         no loss where the input token is eod (predicting the next document's first token
                          from the previous one's end teaches nothing).

The attention side is given as ``cu_seqlens``: the micro-batch's rows laid end to end as one sequence of
b * s tokens, cut at each row's start and after each eod, which is what ``kernels.flash_attention``'s packed
path takes with q/k/v of shape (1, b * s, h, d). Everything here is computed on the host-side batch tensor,
before the micro-batch goes to the model.
"""
import torch


def document_starts(tokens, eod):
    """Bool [b, s]: True where a document starts (each row's first token, and every token after an eod)."""
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eod
    return starts


def reset_positions(starts):
    """Position ids [b, s] that count from 0 at every document start."""
    s = starts.shape[1]
    index = torch.arange(s, device=starts.device).expand_as(starts)
    # the index of the latest start at or before each token, by a running maximum
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - last_start


def packed_cu_seqlens(starts):
    """int32 (n + 1,): the document boundaries of the rows laid end to end (b * s tokens in all)."""
    flat = starts.reshape(-1).nonzero().squeeze(1)
    total = torch.tensor([starts.numel()], device=starts.device)
    return torch.cat([flat, total]).to(torch.int32)


def document_mask(tokens, eod, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False):
    """The micro-batch's extra inputs as a dict, each present only when its flag asks for it:
    ``position_ids`` [b, s], ``cu_seqlens`` (int32, see packed_cu_seqlens) and ``loss_mask`` [b, s] (float,
    0 where the input token is eod)."""
    out = {}
    if reset_position_ids or reset_attention_mask:
        starts = document_starts(tokens, eod)
        if reset_position_ids:
            out["position_ids"] = reset_positions(starts)
        if reset_attention_mask:
            out["cu_seqlens"] = packed_cu_seqlens(starts)
    if eod_mask_loss:
        out["loss_mask"] = (tokens != eod).float()
    return out
