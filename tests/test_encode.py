"""Tokenization, caching, batching and MLM masking."""

from __future__ import annotations

import torch

from merging_core import encode, tasks
from merging_core.encode import IGNORE


def test_sequence_pairs_keep_segments(tokenizer):
    enc = encode.encode(tasks.get_task("mrpc"), "dev", tokenizer)
    first = enc.ids[enc.offsets[0]: enc.offsets[1]]
    types = enc.type_ids[enc.offsets[0]: enc.offsets[1]]
    assert first[0] == tokenizer.cls_token_id and (first == tokenizer.sep_token_id).sum() == 2
    assert types[0] == 0 and types[-1] == 1  # the second sentence is segment 1
    assert enc.labels.shape == (408,)


def test_token_labels_only_on_first_subword(tokenizer):
    spec = tasks.get_task("conll2003")
    enc = encode.encode(spec, "dev", tokenizer)
    for i in range(50):
        labels = enc.labels[enc.offsets[i]: enc.offsets[i + 1]]
        words = enc.word_tags(i)
        # One labelled position per word (no sentence in the first 50 is truncated), in word order.
        assert labels[labels != IGNORE].tolist() == words
        assert labels[0] == IGNORE and labels[-1] == IGNORE  # [CLS], [SEP]


def test_truncated_sentences_keep_all_gold_words(tokenizer):
    spec = tasks.get_task("conll2003")
    enc = encode.encode(spec, "dev", tokenizer, max_length=8)
    longest = int(torch.argmax(enc.word_offsets[1:] - enc.word_offsets[:-1]))
    labelled = (enc.labels[enc.offsets[longest]: enc.offsets[longest + 1]] != IGNORE).sum()
    assert labelled < len(enc.word_tags(longest))  # the head saw fewer words than gold has


def test_cache_in_memory_and_on_disk(tokenizer, isolated_home):
    encode._MEMORY.clear()  # other tests may have encoded CoLA under another home
    spec = tasks.get_task("cola")
    first = encode.encode(spec, "dev", tokenizer)
    assert encode.encode(spec, "dev", tokenizer) is first  # memory
    files = list((isolated_home / "cache" / "tokenized").glob("cola-dev-*.safetensors"))
    assert len(files) == 1
    encode._MEMORY.clear()
    again = encode.encode(spec, "dev", tokenizer)  # disk
    assert again is not first and torch.equal(again.ids, first.ids) and torch.equal(again.labels, first.labels)


def test_batch_pads_and_masks(tokenizer):
    enc = encode.encode(tasks.get_task("sst2"), "dev", tokenizer)
    index = torch.tensor([3, 0, 5])
    batch = enc.batch(index, tokenizer.pad_token_id)
    lengths = enc.lengths[index]
    assert batch["input_ids"].shape == (3, int(lengths.max()))
    assert batch["attention_mask"].sum(1).tolist() == lengths.tolist()
    for row, i in enumerate(index.tolist()):
        n = int(lengths[row])
        assert torch.equal(batch["input_ids"][row, :n], enc.ids[enc.offsets[i]: enc.offsets[i + 1]].long())
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
    assert batch["labels"].tolist() == enc.labels[index].tolist()


def test_head_and_subset_agree(tokenizer):
    enc = encode.encode(tasks.get_task("conll2003"), "dev", tokenizer)
    head, subset = enc.head(10), enc.subset(torch.arange(10))
    for field in ("ids", "offsets", "labels", "word_labels", "word_offsets"):
        assert torch.equal(getattr(head, field), getattr(subset, field)), field
    picked = enc.subset(torch.tensor([7, 2]))
    assert picked.word_tags(0) == enc.word_tags(7) and picked.word_tags(1) == enc.word_tags(2)


def test_mlm_blocks(tokenizer):
    enc = encode.encode(tasks.get_task("wikitext2"), "dev", tokenizer)
    assert (enc.lengths[:-1] == 128).all() and enc.lengths[-1] >= 64  # a tail under half a block is dropped
    assert (enc.ids[enc.offsets[:-1]] == tokenizer.cls_token_id).all()
    assert "<unk>" not in tokenizer.decode(enc.ids[:2000].tolist())


def test_mlm_mask_rates_and_determinism(tokenizer):
    enc = encode.encode(tasks.get_task("wikitext2"), "dev", tokenizer)
    ids = enc.ids.long()
    masked, labels = encode.mlm_mask(ids, tokenizer, torch.Generator().manual_seed(0))
    again, labels_again = encode.mlm_mask(ids, tokenizer, torch.Generator().manual_seed(0))
    assert torch.equal(masked, again) and torch.equal(labels, labels_again)
    picked = labels != IGNORE
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    assert not (picked & special).any()
    rate = picked.sum() / (~special).sum()
    assert 0.14 < rate < 0.16
    became_mask = (masked[picked] == tokenizer.mask_token_id).float().mean()
    unchanged = (masked[picked] == ids[picked]).float().mean()
    assert 0.78 < became_mask < 0.82 and 0.09 < unchanged < 0.12  # 10% kept, plus random hits of itself
    assert torch.equal(labels[picked], ids[picked]) and torch.equal(masked[~picked], ids[~picked])
