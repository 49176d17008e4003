
import pytest
import torch

from megatron.bridge.data import MockGPTDataset

VOCAB = 1000


def make(**overrides) -> MockGPTDataset:
    kwargs = dict(num_samples=16, seq_length=1024, vocab_size=VOCAB, seed=1234, split="train")
    kwargs.update(overrides)
    return MockGPTDataset(**kwargs)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_same_arguments_give_identical_samples():
    first, second = make(), make()
    for index in range(len(first)):
        assert_same(first[index], second[index])


@pytest.mark.parametrize("change", [{"split": "valid"}, {"split": "test"}, {"seed": 99}])
def test_split_and_seed_change_the_samples(change):
    base, other = make(), make(**change)
    assert not torch.equal(base[0]["tokens"], other[0]["tokens"])


def test_indices_differ_and_reads_are_repeatable():
    ds = make()
    assert not torch.equal(ds[0]["tokens"], ds[1]["tokens"])
    before = ds[3]
    ds[0]  # reading another sample in between must not disturb any state
    assert_same(ds[3], before)


def test_shapes_dtypes_and_default_keys():
    sample = make(seq_length=64)[0]
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
    for key in ("tokens", "labels", "position_ids"):
        assert sample[key].shape == (64,) and sample[key].dtype == torch.int64
    assert sample["loss_mask"].dtype == torch.float32
    assert torch.all(sample["loss_mask"] == 1.0)
    assert torch.equal(sample["position_ids"], torch.arange(64))


def test_labels_are_tokens_shifted_by_one():
    for sample in (make()[i] for i in range(4)):
        assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])


def test_documents_count_upward_modulo_the_vocabulary():
    ds = make(vocab_size=50, seq_length=2048)
    eod = ds.eod
    assert eod == 49
    tokens, labels = ds[0]["tokens"], ds[0]["labels"]
    assert tokens.min() >= 0 and tokens.max() <= eod
    inside = (tokens != eod) & (labels != eod)
    assert inside.sum() > 1000
    assert torch.equal(labels[inside], (tokens[inside] + 1) % eod)


def test_end_of_document_tokens_separate_documents_of_bounded_length():
    for index in range(4):
        tokens = make(seq_length=4096)[index]["tokens"]
        eods = torch.nonzero(tokens == VOCAB - 1).flatten()
        assert len(eods) >= 4096 // 257
        # The sample starts at a document start; each document is followed by exactly one eod.
        lengths = torch.diff(torch.cat([torch.tensor([-1]), eods])) - 1
        assert lengths.min() >= 16 and lengths.max() <= 256


def test_document_length_is_capped_at_short_sequences():
    ds = make(seq_length=8, vocab_size=5)
    for index in range(len(ds)):
        sample = ds[index]
        packed = torch.cat([sample["tokens"], sample["labels"][-1:]])
        assert packed[8] == 4  # one 8-token document, then its eod
        assert torch.all(packed[:8] != 4)


def test_eod_mask_loss_zeroes_eod_positions():
    sample = make(eod_mask_loss=True)[0]
    assert torch.equal(sample["loss_mask"], (sample["tokens"] != VOCAB - 1).float())
    assert sample["loss_mask"].min() == 0.0


def test_reset_position_ids_restart_after_each_eod():
    sample = make(reset_position_ids=True)[0]
    tokens, positions = sample["tokens"], sample["position_ids"]
    expected, position = [], 0
    for token in tokens.tolist():
        expected.append(position)
        position = 0 if token == VOCAB - 1 else position + 1
    assert torch.equal(positions, torch.tensor(expected))
    assert (positions == 0).sum() > 1


def test_reset_attention_mask_is_block_diagonal_causal():
    sample = make(seq_length=96, vocab_size=40, reset_attention_mask=True)[2]
    mask = sample["attention_mask"]
    assert mask.shape == (1, 96, 96) and mask.dtype == torch.bool
    # Reference: Megatron's construction, cutting attention after every eod.
    visible = torch.tril(torch.ones(96, 96, dtype=torch.bool))
    for eod_index in torch.nonzero(sample["tokens"] == 39).flatten().tolist():
        visible[eod_index + 1 :, : eod_index + 1] = False
    assert torch.equal(mask[0], ~visible)
    assert not torch.equal(mask[0], ~torch.tril(torch.ones(96, 96, dtype=torch.bool)))


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="split"):
        make(split="training")
    with pytest.raises(ValueError):
        make(vocab_size=1)
    with pytest.raises(IndexError):
        make(num_samples=2)[2]
