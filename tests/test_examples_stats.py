import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from lightning_llmdbg.dynamics import DynamicsTable
from lightning_llmdbg.examples_stats import (
    auroc,
    causal_lm_losses,
    classifier_stats,
    display_tokens,
    global_topk,
    labels_look_shifted,
    merge_topk,
    precision_at_k,
)
from lightning_llmdbg.examples_text import marked_markdown, redacted_segments, token_list, token_pieces


def _lm_batch(seed=0, B=5, T=9, V=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 3
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not scored
    labels[2, 6:] = -100  # padding
    labels[3, :] = -100  # nothing scored at all
    return logits, ids, labels


def test_causal_lm_losses_equal_cross_entropy_by_hand_with_ignored_labels():
    logits, _, labels = _lm_batch()
    per_example, per_token = causal_lm_losses(logits, labels, shift=True)
    for b in range(logits.shape[0]):
        scored = [t for t in range(1, labels.shape[1]) if labels[b, t] != -100]
        if not scored:
            assert math.isnan(per_example[b])
            continue
        by_hand = [F.cross_entropy(logits[b, t - 1], labels[b, t]).item() for t in scored]
        assert per_example[b].item() == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-6)
        expected = F.cross_entropy(logits[b, :-1], labels[b, 1:], ignore_index=-100, reduction="none")
        assert per_example[b].item() == pytest.approx(expected.sum().item() / len(scored), rel=1e-6)
        for t in range(labels.shape[1]):  # aligned with the token that is predicted
            want = F.cross_entropy(logits[b, t - 1], labels[b, t]).item() if t in scored else float("nan")
            assert per_token[b, t].item() == pytest.approx(want, rel=1e-6, nan_ok=True)


def test_pre_shifted_labels_are_scored_without_a_shift_and_shown_with_the_last_label():
    logits, ids, _ = _lm_batch(seed=1)
    labels = torch.cat([ids[:, 1:], torch.randint(0, 11, (ids.shape[0], 1))], dim=1)  # the next tokens
    assert labels_look_shifted(ids, labels) and not labels_look_shifted(ids, ids.clone())
    per_example, per_token = causal_lm_losses(logits, labels, shift=False)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    assert torch.allclose(per_example, expected.mean(dim=1))
    shown = display_tokens(ids, labels, shift=False)
    assert shown.shape[1] == ids.shape[1] + 1 and torch.equal(shown[:, -1], labels[:, -1])
    assert torch.allclose(per_token[:, 1:], expected) and per_token[:, 0].isnan().all()


def test_streaming_topk_merge_equals_the_topk_of_everything():
    g = torch.Generator().manual_seed(0)
    keys, rows = torch.empty(0), {}
    everything = []
    for step in range(20):
        B, T = 6, int(torch.randint(3, 9, (1,), generator=g))  # sequence length changes between batches
        loss = torch.rand(B, generator=g)
        loss[0] = float("nan")  # never ranked
        tokens = torch.randint(0, 50, (B, T), generator=g)
        new = {"loss": loss, "input_ids": tokens, "step": torch.full((B,), step)}
        keys, rows = merge_topk(keys, rows, loss, new, 7, {"input_ids": -1})
        everything += [(float(loss[i]), step, tokens[i].tolist()) for i in range(1, B)]
    expected = sorted(everything, key=lambda x: -x[0])[:7]
    assert keys.tolist() == pytest.approx([e[0] for e in expected])
    assert rows["step"].tolist() == [e[1] for e in expected]
    for i, (_, _, tokens) in enumerate(expected):  # token ids travelled with their losses, padded with -1
        kept = rows["input_ids"][i]
        assert kept[: len(tokens)].tolist() == tokens and (kept[len(tokens):] == -1).all()


def test_global_topk_picks_across_ranks():
    gathered = torch.tensor([[5.0, 3.0, float("-inf")], [4.0, 3.0, 1.0]])
    assert global_topk(gathered, 4) == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert global_topk(torch.full((2, 3), float("-inf")), 3) == []


def test_classifier_margin_and_confidence_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    target = torch.tensor([0, 2])
    out = classifier_stats(logits, target)
    assert out["margin"].tolist() == pytest.approx([1.5, -2.0])
    assert out["confidence"].tolist() == pytest.approx([logits[0].softmax(0)[0].item(), logits[1].softmax(0)[2].item()])
    assert out["correct"].tolist() == [1.0, 0.0] and out["predicted"].tolist() == [0.0, 1.0]
    assert out["loss"].tolist() == pytest.approx(F.cross_entropy(logits, target, reduction="none").tolist())


def test_auroc_equals_the_pair_count_with_ties():
    rng = random.Random(0)
    scores = torch.tensor([float(rng.randint(0, 5)) for _ in range(40)])
    positives = torch.tensor([rng.random() < 0.3 for _ in range(40)])
    pairs = [(s_p > s_n) + 0.5 * (s_p == s_n) for s_p, s_n in itertools.product(scores[positives].tolist(), scores[~positives].tolist())]
    assert auroc(scores, positives) == pytest.approx(sum(pairs) / len(pairs))
    assert precision_at_k(torch.tensor([0.9, 0.1, 0.8, 0.7]), torch.tensor([True, False, False, True]), 2) == 0.5


def test_dynamics_table_matches_per_id_bookkeeping_by_hand():
    g = torch.Generator().manual_seed(0)
    table = DynamicsTable(flush_every=3)
    seen: dict[int, list[tuple[float, float, float, float]]] = {}
    for _ in range(10):
        ids = torch.randperm(3000, generator=g)[:8]  # ids beyond the first capacity: the table grows
        loss, margin, conf = torch.rand(8, generator=g), torch.randn(8, generator=g), torch.rand(8, generator=g)
        correct = (margin > 0).float()
        table.add(torch.stack([ids.double(), loss.double(), margin.double(), conf.double(), correct.double()], dim=1))
        for i in range(8):
            seen.setdefault(int(ids[i]), []).append((loss[i].item(), margin[i].item(), conf[i].item(), correct[i].item()))
    restored = DynamicsTable()
    restored.load_state_dict(table.state_dict())
    for t in (table, restored):
        scores = t.scores()
        assert scores["id"].tolist() == sorted(seen)
        for j, i in enumerate(scores["id"].tolist()):
            history = seen[i]
            c = [h[2] for h in history]
            mean_c = sum(c) / len(c)
            assert scores["presentations"][j] == len(history)
            assert scores["mean_loss"][j].item() == pytest.approx(sum(h[0] for h in history) / len(history))
            assert scores["last_loss"][j].item() == pytest.approx(history[-1][0])
            assert scores["aum"][j].item() == pytest.approx(sum(h[1] for h in history) / len(history))
            assert scores["confidence"][j].item() == pytest.approx(mean_c)
            assert scores["variability"][j].item() == pytest.approx(math.sqrt(sum((x - mean_c) ** 2 for x in c) / len(c)), abs=1e-7)
            forgot = sum(1 for a, b in zip(history, history[1:]) if a[3] == 1.0 and b[3] == 0.0)
            assert scores["forgetting"][j].item() == forgot
            assert scores["suspicion"][j].item() == pytest.approx(-scores["aum"][j].item())


def test_bytes_decode_gives_each_multibyte_character_to_the_token_that_completes_it():
    ids = list("aé€".encode())
    assert token_pieces(ids) == ["a", "", "é", "", "", "€"]
    assert token_pieces([3, 300]) == ["[3]", "[300]"]
    assert token_pieces([1, 2], decode=lambda ids: f"<{ids[0]}>") == ["<1>", "<2>"]


def test_redaction_sees_the_plain_text_and_hides_marked_tokens_inside_a_secret():
    pieces = ["my ", "key ", "sk-", "98", "76", " ok"]
    segments = redacted_segments(pieces, lambda text: text.replace("sk-9876", "[KEY]"))
    assert "".join(s.text for s in segments) == "my key [KEY] ok"
    marked = {3}  # the hardest token sits inside the secret: redaction still sees the whole secret
    assert marked_markdown(segments, marked) == "my key \\[KEY\\] ok"
    assert token_list([3, 1], [0, 1.0, 0, 7.5, 0, 0], segments) == "@3 7.5; 'key ' 1"
    assert marked_markdown(redacted_segments(pieces, None), {1, 2}) == "my **key sk-**9876 ok"


def test_dynamics_table_leaves_out_rows_without_an_id_or_a_finite_loss():
    table = DynamicsTable(flush_every=1)
    rows = torch.tensor(
        [[0, 1.0, 0.5, 0.4, 1.0], [1, float("nan"), 0.1, 0.2, 1.0], [-1, 2.0, 0.3, 0.3, 0.0], [1, 3.0, -0.2, 0.1, 0.0]],
        dtype=torch.float64,
    )
    table.add(rows)
    scores = table.scores()
    assert scores["id"].tolist() == [0, 1]
    assert scores["presentations"].tolist() == [1, 1]
    assert scores["mean_loss"].tolist() == [1.0, 3.0]  # id 1's NaN presentation did not poison it
