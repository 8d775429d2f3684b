"""Document masking (megagopher.data.document_mask) against Megatron-Core's own
``_get_ltor_masks_and_position_ids``, row by row: position ids, loss mask, and the attention mask that our
packed cu_seqlens describe (the rows laid end to end; token i sees token j when both lie in one document
and j <= i). Rows with an eod first, last, twice in a row, and none. And the model: packed documents,
positions reset and attention kept within each document, score every token as the document alone does."""
import warnings

import pytest
import torch

from megagopher import kernels
from megagopher.data.document_mask import document_mask

EOD = 0


def _megatron():
    with warnings.catch_warnings():  # megatron.core's package __init__ warns about Transformer Engine / apex
        warnings.simplefilter("ignore")
        from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids
    return _get_ltor_masks_and_position_ids


def _rows():
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(1, 9, (5, 23), generator=g)
    rows[0, 0] = EOD                   # a document of one token first
    rows[0, 22] = EOD                  # and an eod at the very end (the next document starts past the row)
    rows[1, 5] = rows[1, 6] = EOD      # an empty-looking document: an eod right after an eod
    rows[1, 15] = EOD
    rows[3, 11] = EOD                  # row 2 and row 4 keep no eod at all
    return rows


def _mask_from_cu_seqlens(cu, total):
    doc = torch.zeros(total, dtype=torch.long)
    for start in cu[1:-1].tolist():
        doc[start:] += 1
    i = torch.arange(total)
    return (doc[:, None] == doc[None, :]) & (i[None, :] <= i[:, None])  # True = visible


def test_matches_megatron_row_by_row():
    reference = _megatron()
    tokens = _rows()
    ours = document_mask(tokens, EOD, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    b, s = tokens.shape
    visible = _mask_from_cu_seqlens(ours["cu_seqlens"], b * s)
    for row in range(b):
        mask, loss_mask, position_ids = reference(tokens[row], EOD, True, True, True, True)
        assert torch.equal(ours["position_ids"][row], position_ids), row
        assert torch.equal(ours["loss_mask"][row], loss_mask), row
        block = visible[row * s:(row + 1) * s, row * s:(row + 1) * s]
        assert torch.equal(block, ~mask[0]), row  # Megatron's True means masked
    # and no token sees another row
    for row in range(b):
        assert not visible[row * s:(row + 1) * s, :row * s].any()


def test_each_flag_alone():
    tokens = _rows()
    assert document_mask(tokens, EOD) == {}
    assert set(document_mask(tokens, EOD, reset_position_ids=True)) == {"position_ids"}
    assert set(document_mask(tokens, EOD, reset_attention_mask=True)) == {"cu_seqlens"}
    only_loss = document_mask(tokens, EOD, eod_mask_loss=True)
    assert set(only_loss) == {"loss_mask"} and only_loss["loss_mask"].sum() == (tokens != EOD).sum()
    cu = document_mask(tokens, EOD, reset_attention_mask=True)["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == tokens.numel()
    assert (cu[1:] > cu[:-1]).all()  # no empty documents: a row's first token always starts one


def _tiny_model(position_embedding):
    from megagopher.model import GPTConfig, GPTModel
    cfg = GPTConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=12,
                    seq_length=24, normalization="rmsnorm", activation="swiglu",
                    position_embedding=position_embedding, make_vocab_size_divisible_by=4)
    return GPTModel(cfg).initialize(5)


@pytest.mark.parametrize("backend, position_embedding", [("torch", "rope"), ("torch", "learned"),
                                                          ("triton", "rope")])
def test_packed_documents_score_as_if_alone(backend, position_embedding):
    """Per-token losses of packed rows, with positions reset and attention kept within documents, equal
    those of every document run on its own from position 0 (fp32)."""
    model = _tiny_model(position_embedding)
    g = torch.Generator().manual_seed(11)
    sample = torch.randint(1, 12, (2, 25), generator=g)
    sample[0, [4, 5, 17]] = EOD
    sample[1, 9] = EOD
    tokens, labels = sample[:, :-1], sample[:, 1:]
    extra = document_mask(tokens, EOD, reset_position_ids=True, reset_attention_mask=True)
    with kernels.use_backend(backend):
        packed = model(tokens, labels=labels, position_ids=extra["position_ids"], cu_seqlens=extra["cu_seqlens"])
        plain = model(tokens, labels=labels)
        cu = extra["cu_seqlens"].tolist()
        for start, end in zip(cu[:-1], cu[1:]):
            row, a, b = start // 24, start % 24, (end - 1) % 24 + 1
            alone = model(tokens[row:row + 1, a:b], labels=labels[row:row + 1, a:b])
            assert torch.allclose(packed[row, a:b], alone[0], atol=1e-5, rtol=1e-5), (row, a, b)
    # and the masking matters: without it the later documents' losses differ
    assert not torch.allclose(packed, plain, atol=1e-3)
