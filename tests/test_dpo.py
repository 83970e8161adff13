"""DPO: preference rows, the loss against TRL's as an oracle, and SFT -> DPO jobs through the MCP tools."""

from __future__ import annotations

import json

import anyio
import pytest
from mcp import Client

from llm_mcp.core.data import DataError, load_rows, validate_dataset
from llm_mcp.core.jobdir import read_metrics
from llm_mcp.tiny import PREFERENCE_THINGS, preference_rows
from tests.conftest import wait_final

FAST = dict(lora_dropout=0.0, batch_size=4, max_seq_len=64)
pytestmark = pytest.mark.anyio


def pair(thing: str, adjective: str, chat: bool) -> dict:
    prompt, chosen, rejected = (
        f"Is {thing} {adjective}?",
        f"Yes, {thing} is {adjective}.",
        f"No, {thing} is not {adjective}.",
    )
    if chat:
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def write_jsonl(path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture
def preference_data(home):
    """64 training pairs over 8 things (strings and chat alternating), 32 held-out pairs over 4 others, and SFT
    conversations over all 12 things."""
    write_jsonl(home / "data" / "pref.jsonl", preference_rows(PREFERENCE_THINGS[:8])["pairs"])
    write_jsonl(home / "data" / "pref_eval.jsonl", preference_rows(PREFERENCE_THINGS[8:], chat_every=1)["pairs"])
    write_jsonl(home / "data" / "sft.jsonl", preference_rows(PREFERENCE_THINGS[:8])["sft"])
    write_jsonl(home / "data" / "sft_eval.jsonl", preference_rows(PREFERENCE_THINGS[8:])["sft"])


def test_three_preference_shapes_normalize_to_one(tmp_path):
    rows = [
        {"prompt": "Is ice cold?", "chosen": "Yes.", "rejected": "No."},
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is ice cold?"}],
            "chosen": [{"role": "assistant", "content": "Yes."}],
            "rejected": "No.",
        },
        {
            "chosen": [{"role": "user", "content": "Is ice cold?"}, {"role": "assistant", "content": "Yes."}],
            "rejected": [{"role": "user", "content": "Is ice cold?"}, {"role": "assistant", "content": "No."}],
        },
        {
            "input": {"messages": [{"role": "user", "content": "Is ice cold?"}]},
            "preferred_output": [{"role": "assistant", "content": "Yes."}],
            "non_preferred_output": [{"role": "assistant", "content": "No."}],
        },
    ]
    path = tmp_path / "pref.jsonl"
    write_jsonl(path, rows)
    summary = validate_dataset(path, objective="dpo")
    assert summary.formats == {"preference": 4} and summary.rows == 4
    loaded = load_rows(path)
    assert loaded[0] == rows[0]
    user = [{"role": "user", "content": "Is ice cold?"}]
    yes, no = [{"role": "assistant", "content": "Yes."}], [{"role": "assistant", "content": "No."}]
    assert loaded[1] == {"prompt": rows[1]["prompt"], "chosen": yes, "rejected": no}
    assert loaded[2] == loaded[3] == {"prompt": user, "chosen": yes, "rejected": no}


@pytest.mark.parametrize(
    "row, objective, expected",
    [
        ({"prompt": "Q", "chosen": "A"}, "dpo", "line 2: missing 'rejected'"),
        ({"prompt": "Q", "chosen": "A", "rejected": "A"}, "dpo", "line 2: 'chosen' and 'rejected' are the same"),
        (
            {"prompt": "Q", "chosen": [{"role": "user", "content": "A"}], "rejected": "B"},
            "dpo",
            "line 2: 'chosen' must hold the assistant's answer only",
        ),
        (
            {"chosen": [{"role": "assistant", "content": "A"}], "rejected": [{"role": "assistant", "content": "B"}]},
            "dpo",
            "line 2: 'chosen' and 'rejected' must be the same conversation up to the final assistant answer",
        ),
        ({"input": {"messages": []}, "preferred_output": []}, "dpo", "line 2: missing 'non_preferred_output'"),
        ({"prompt": "Q", "completion": "A"}, "dpo", "line 2: a prompt_completion row in a DPO job"),
        (
            {"prompt": "Q", "chosen": "A", "rejected": "B"},
            "causal_lm",
            "line 2: a preference row (chosen / rejected) in a causal_lm job; train on it with objective='dpo'",
        ),
    ],
)
def test_bad_preference_rows_are_named_by_line(tmp_path, row, objective, expected):
    good = {"prompt": "Q", "chosen": "A", "rejected": "B"} if objective == "dpo" else {"text": "hello"}
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [good, row])
    with pytest.raises(DataError) as err:
        validate_dataset(path, objective=objective)
    assert expected in str(err.value), str(err.value)


def test_pair_labels_cover_exactly_the_answer_tokens(tiny_model_template):
    from llm_mcp.modeling.encode import IGNORE, chat_ids, tokenizer_for
    from llm_mcp.train.dpo import DPOObjective

    tok = tokenizer_for(str(tiny_model_template))
    obj = DPOObjective()
    row = {
        "prompt": [{"role": "user", "content": "Is ice cold?"}],
        "chosen": [{"role": "assistant", "content": "Yes."}],
        "rejected": [{"role": "assistant", "content": "No, it is not."}],
    }
    (example,), stats = obj.encode(tok, [row], _cfg(max_seq_len=64))
    assert example["prompt"] == chat_ids(tok, row["prompt"], add_generation_prompt=True)
    batch = obj.collate([example], tok.pad_token_id)
    assert obj.targets(batch).item() == 1 and batch["input_ids"].shape[0] == 2
    for i, text in enumerate(["Yes.", "No, it is not."]):
        trained = [t for t in batch["labels"][i].tolist() if t != IGNORE]
        assert tok.decode(trained) == text + tok.eos_token
        assert batch["input_ids"][i, : len(example["prompt"])].tolist() == example["prompt"]
    assert stats.target_tokens == len(example["chosen"]) + len(example["rejected"])


def test_label_smoothing_is_conservative_dpo():
    import torch

    from llm_mcp.train.dpo import dpo_losses

    policy, reference = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    losses, chosen, rejected = dpo_losses(policy, reference, beta=0.5, label_smoothing=0.2)
    d = 0.5 * ((-3.0 + 4.0) - (-5.0 + 4.0))
    expected = -0.8 * torch.nn.functional.logsigmoid(torch.tensor(d)) - 0.2 * torch.nn.functional.logsigmoid(
        torch.tensor(-d)
    )
    assert losses.item() == pytest.approx(expected.item(), abs=1e-7)
    assert (chosen.item(), rejected.item()) == (pytest.approx(0.5), pytest.approx(-0.5))


def _cfg(**overrides):
    from llm_mcp.core.jobconfig import JobConfig

    base = dict(
        model={"id": "tiny", "path": "tiny"},
        method="lora",
        objective="dpo",
        dpo={"beta": 0.1},
        dataset="d.jsonl",
        learning_rate=1e-4,
        batch_size=2,
        gradient_accumulation=1,
        max_seq_len=64,
        checkpoint_every=0,
        keep_checkpoints=1,
        warmup_ratio=0.0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        lora={"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    )
    return JobConfig.parse({**base, **overrides})


def test_dpo_loss_and_rewards_match_trl(tiny_model_template, tmp_path):
    """TRL's DPOTrainer as an oracle: same model, same batch, the reference = the adapter as training starts."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from llm_mcp.modeling.encode import tokenizer_for
    from llm_mcp.train.dpo import DPOObjective

    tok = tokenizer_for(str(tiny_model_template))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_template), dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=["q_proj", "v_proj"]),
    )
    rows = [
        pair("ice", "cold", chat=False),
        pair("the sea", "big", chat=True),
        {"prompt": "Name a color.", "chosen": "Red.", "rejected": "Seven, I think, or maybe eight."},
    ]
    obj = DPOObjective(beta=0.3)
    examples, _ = obj.encode(tok, rows, _cfg(max_seq_len=64))
    wrapped = obj.wrap(model)
    obj.reference(wrapped, examples, tok.pad_token_id, 8, "cpu")  # the starting model, as a job does
    trainer = DPOTrainer(
        model=model,
        processing_class=tok,
        train_dataset=Dataset.from_list(rows[:1] * 2),
        args=DPOConfig(output_dir=str(tmp_path), beta=0.3, report_to=[], use_cpu=True),
    )
    with torch.no_grad():  # training moved the adapter away from the reference
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if ".default." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    batch = obj.collate(examples, tok.pad_token_id)
    model.eval()
    ours = (obj.loss_sum(wrapped, batch) / obj.targets(batch)).item()
    metrics = obj.pop_metrics(lambda t: t)
    trainer.model.eval()
    theirs = trainer._compute_loss(
        trainer.model,
        {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "completion_mask": (batch["labels"] != -100).long(),
        },
        False,
    )
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    assert abs(ours - 0.6931) > 1e-3  # policy and reference differ: the comparison is not trivially equal
    assert ours == pytest.approx(theirs.item(), abs=1e-5)
    assert metrics["reward_accuracy"] == pytest.approx(logged["rewards/accuracies"], abs=1e-5)
    assert metrics["reward_margin"] == pytest.approx(logged["rewards/margins"], abs=1e-5)
    assert metrics["chosen_reward"] == pytest.approx(logged["rewards/chosen"], abs=1e-5)


async def test_dpo_arguments_are_checked(app, tiny_model, preference_data, dataset):
    _, server = app
    base = dict(model="models/tiny", method="lora", dataset="data/pref.jsonl", dry_run=True)
    async with Client(server) as client:

        async def problems(**args) -> str:
            result = await client.call_tool("start_finetune", {**base, **args})
            assert result.is_error
            return result.content[0].text

        assert "['beta'] only apply to objective='dpo'" in await problems(dataset="data/train.jsonl", beta=0.2)
        assert "train_on does not apply to objective='dpo'" in await problems(objective="dpo", train_on="all")
        assert "beta=0.0 is out of range" in await problems(objective="dpo", beta=0.0)
        text = await problems(objective="dpo", dataset="data/train.jsonl")
        assert "line 1: a messages row in a DPO job" in text and "'prompt', 'chosen' and 'rejected'" in text
        assert "a preference row (chosen / rejected) in a causal_lm job" in await problems()
        assert "init_from: " in await problems(objective="dpo", init_from="ft-nope")
        dry = await client.call_tool("start_finetune", {**base, "objective": "DPO"})
    cfg = dry.structured_content["config"]
    assert not dry.is_error and cfg["objective"] == "dpo" and cfg["dpo"] == {"beta": 0.1, "label_smoothing": 0.0}
    assert cfg["learning_rate"] == pytest.approx(0.025 * _local_lr(app[0])), cfg["learning_rate"]
    assert "DPO (beta 0.1)" in dry.content[0].text


def _local_lr(state) -> float:
    from llm_mcp.core.local_models import resolve_model

    return resolve_model(state.matrix, state.settings, "models/tiny").recommended_lr


@pytest.mark.slow
async def test_sft_evaluate_dpo_evaluate_and_an_exact_resume(app, tiny_model, preference_data):
    """The worked example: SFT job -> evaluate against base -> DPO from the SFT adapter -> evaluate again.
    Held-out reward accuracy rises from 0 (all ties) to >= 0.9; a DPO job cancelled and resumed reproduces the
    uninterrupted run step for step (same reference log-probs, same batches)."""
    state, server = app
    async with Client(server) as client:
        sft = await client.call_tool(
            "start_finetune",
            dict(
                model="models/tiny", method="lora", dataset="data/sft.jsonl", max_steps=12, learning_rate=3e-3, **FAST
            ),
        )
        sft_id = sft.structured_content["job_id"]
        assert (await wait_final(client, sft_id))["state"] == "succeeded"
        after_sft = await evaluate(client, targets=["base", sft_id], dataset="data/sft_eval.jsonl", max_tokens=8)
        args = dict(
            model="models/tiny",
            method="lora",
            objective="dpo",
            dataset="data/pref.jsonl",
            eval_dataset="data/pref_eval.jsonl",
            init_from=sft_id,
            learning_rate=2e-3,
            max_steps=60,
            checkpoint_every=0,
            batch_size=4,
            max_seq_len=64,
        )
        refused = await client.call_tool("start_finetune", {**args, "method": "sparse", "lora_rank": 8})
        assert refused.is_error
        assert "holds a lora adapter, which method='sparse' cannot continue" in refused.content[0].text
        assert "['lora_rank'] come from init_from" in refused.content[0].text
        full = (await client.call_tool("start_finetune", args)).structured_content["job_id"]
        job = await wait_final(client, full)
        status = await client.call_tool("job_status", {"job_id": full})
        sampled = await client.call_tool("sample", {"job_id": full, "prompt": "Is ice cold?", "max_tokens": 8})
        interrupted = (await client.call_tool("start_finetune", args)).structured_content["job_id"]
        while not [m for m in read_metrics(state.store.job_dir(interrupted)) if m.get("step", 0) >= 10]:
            await anyio.sleep(0.05)
        await client.call_tool("cancel_job", {"job_id": interrupted})
        stopped = await wait_final(client, interrupted)
        stopped_at = stopped["checkpoints"][-1]["step"]
        after_dpo = await evaluate(
            client, targets=["base", sft_id, full, f"{interrupted}@{stopped_at}"], dataset="data/pref_eval.jsonl"
        )
        resumed = (await client.call_tool("start_finetune", {**args, "resume_from": interrupted})).structured_content
        finished = await wait_final(client, resumed["job_id"])
    base, tuned = after_sft["targets"]
    assert tuned["loss"] < base["loss"] and tuned["exact_match_rows"] == 32, after_sft
    assert job["state"] == "succeeded", job
    assert job["objective"] == "dpo" and job["eval_reward_accuracy"] >= 0.9 and job["eval_reward_margin"] > 0, job
    assert job["reward_accuracy"] >= 0.9 and job["loss"] < 0.5 * job["first_loss"], job
    assert "DPO reward accuracy" in status.content[0].text and "eval reward accuracy" in status.content[0].text
    assert not sampled.is_error and sampled.structured_content["completions"][0]["text"]
    start = next(m for m in read_metrics(state.store.job_dir(full)) if "reward_accuracy" in m)
    assert start["reward_accuracy"] == 0.0  # step 1: the policy still equals the reference, every pair ties
    base, sft_scores, dpo, checkpoint = after_dpo["targets"]
    assert base["preference_accuracy"] <= 0.7 and sft_scores["preference_accuracy"] <= 0.7, after_dpo  # ~chance
    assert dpo["preference_accuracy"] >= 0.8 and dpo["preference_margin"] > sft_scores["preference_margin"] + 1, (
        after_dpo
    )
    assert checkpoint["preference_margin"] > sft_scores["preference_margin"]
    assert checkpoint["target"] == f"{interrupted}@{stopped_at}" and dpo["preference_rows"] == 32
    assert stopped["state"] == "cancelled" and 10 <= stopped_at < 60, stopped
    assert finished["state"] == "succeeded"
    a = {m["step"]: m["loss"] for m in read_metrics(state.store.job_dir(full)) if "loss" in m}
    c = {m["step"]: m["loss"] for m in read_metrics(state.store.job_dir(resumed["job_id"])) if "loss" in m}
    assert sorted(c) == list(range(stopped_at + 1, 61))
    for step in c:
        assert c[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step


async def evaluate(client, **args) -> dict:
    """Run evaluate to the end (it answers at once when quick, else poll job_status); returns its scores."""
    result = await client.call_tool("evaluate", {**args, "wait_seconds": 30})
    assert not result.is_error, result.content[0].text
    job = await wait_final(client, result.structured_content["job_id"])
    assert job["state"] == "succeeded", job
    return job["evaluation"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["qlora", "dora", "sparse"])
async def test_dpo_trains_with_every_method(app, tiny_model, preference_data, method):
    _, server = app
    extra = {"density": 0.05} if method == "sparse" else {}
    async with Client(server) as client:
        started = await client.call_tool(
            "start_finetune",
            dict(
                model="models/tiny",
                method=method,
                objective="dpo",
                dataset="data/pref.jsonl",
                max_steps=20,
                learning_rate=2e-3 if method != "sparse" else 1e-2,
                checkpoint_every=10,
                **FAST,
                **extra,
            ),
        )
        assert not started.is_error, started.content[0].text
        job = await wait_final(client, started.structured_content["job_id"])
        exported = await client.call_tool("export_adapter", {"job_id": job["job_id"], "format": "peft"})
    assert job["state"] == "succeeded", job
    assert job["loss"] < job["first_loss"] and job["reward_accuracy"] > 0.5, job
    assert [c["step"] for c in job["checkpoints"]] == [10]
    assert not exported.is_error, exported.content[0].text


async def test_preference_rows_go_through_save_dataset_and_datasets(app, tiny_model):
    _, server = app
    rows = preference_rows(PREFERENCE_THINGS[:2])["pairs"]
    async with Client(server) as client:
        saved = await client.call_tool("save_dataset", {"name": "prefs", "rows": rows})
        seen = await client.call_tool(
            "datasets", {"path": "data/prefs.jsonl", "model": "models/tiny", "preview_row": 1}
        )
    assert not saved.is_error, saved.content[0].text
    assert not seen.is_error, seen.content[0].text
    text = seen.content[0].text
    assert "preference" in text and "chosen: " in text and "rejected: " in text, text
