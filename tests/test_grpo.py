"""GRPO: graders, the loss against TRL's GRPOTrainer as an oracle, and SFT -> GRPO jobs through the MCP tools
with built-in, http and agent graders (a scripted MCP client as the judge)."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import anyio
import pytest
from mcp import Client

from llm_mcp.core.graders import GraderSpec, check_graders, score_local, total
from llm_mcp.core.jobdir import read_metrics
from llm_mcp.core.reward_http import post_batch, url_problem
from llm_mcp.tiny import PREFERENCE_THINGS
from llm_mcp.tiny.rewards import TARGET, reward_rows
from tests.conftest import wait_final

pytestmark = pytest.mark.anyio
SFT = dict(model="models/tiny", method="lora", dataset="data/sft.jsonl", max_steps=60, learning_rate=3e-3)
FAST = dict(lora_dropout=0.0, batch_size=4, max_seq_len=64)
GRPO = dict(
    model="models/tiny",
    method="lora",
    objective="grpo",
    dataset="data/prompts.jsonl",
    max_new_tokens=4,
    learning_rate=2e-3,
    checkpoint_every=0,
    **FAST,
)
NUMERIC = [{"grader": "numeric"}]


@pytest.fixture(scope="session")
def sharp_model_template(tmp_path_factory):
    """The tiny model with a head that can become sure of a token (a random head cannot: see make_tiny_model)."""
    from llm_mcp.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("sharp") / "tiny", head_scale=10)


@pytest.fixture
def reward_data(home, sharp_model_template):
    """The sharp tiny model as models/tiny; SFT rows over 8 things; 32 GRPO prompts over them; 16 held-out
    prompts over 4 other things (llm_mcp.tiny.rewards)."""
    shutil.copytree(sharp_model_template, home / "models" / "tiny")
    train, held_out = reward_rows(PREFERENCE_THINGS[:8]), reward_rows(PREFERENCE_THINGS[8:], repeats=4)
    (home / "data").mkdir()
    for name, rows in (("sft", train["sft"]), ("prompts", train["prompts"]), ("held_out", held_out["prompts"])):
        (home / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_graders_score_as_documented():
    row = {"answer": "42", "json": {"name": "Ada", "age": 36}, "regex": r"^\d+$"}

    def score(spec: dict, completion: str) -> float:
        g = GraderSpec.model_validate(spec)
        return score_local([g], completion, row)[g.label]

    assert score({"grader": "exact_match"}, "  42 ") == 1 and score({"grader": "exact_match"}, "42.") == 0
    assert score({"grader": "contains", "text": "ADA", "ignore_case": True}, "by ada") == 1
    assert score({"grader": "regex"}, "123") == 1 and score({"grader": "regex", "full": True}, "12a") == 0
    assert score({"grader": "regex", "pattern": "^Answer:"}, "Answer: 4") == 1
    assert score({"grader": "json_fields", "fields": ["name", "age"]}, 'Sure: {"name": "Ada", "age": 36}') == 1
    assert score({"grader": "json_fields", "fields": ["name", "age"]}, '```json\n{"name": "Ada", "age": 3}```') == 0.5
    assert score({"grader": "json_fields", "fields": ["name"]}, "no object") == 0
    assert score({"grader": "numeric"}, "so it is 1,000 then 42.0") == 1
    assert score({"grader": "numeric", "tolerance": 0.5}, "41.6") == 1 and score({"grader": "numeric"}, "41") == 0
    assert (
        score({"grader": "length", "max_chars": 10}, "x" * 15) == 0.5
        and score({"grader": "length", "min_chars": 4}, "ab") == 0.5
    )
    specs = [
        GraderSpec.model_validate(s)
        for s in ({"grader": "numeric"}, {"grader": "length", "max_chars": 2, "weight": -0.5})
    ]
    scores = score_local(specs, "42", row)
    assert total(specs, scores) == 1.0 - 0.5 * 1.0
    with pytest.raises(ValueError, match="reads the row's 'answer'"):
        score_local(specs, "1", {"prompt": "p"})
    problems = check_graders(
        [
            GraderSpec(grader="regex", pattern="(unclosed"),
            GraderSpec(grader="numeric", url="http://127.0.0.1/x"),
            GraderSpec(grader="http", url="http://grader.example.com/score"),
            GraderSpec(grader="json_fields"),
            GraderSpec(grader="length", min_chars=9, max_chars=3),
            GraderSpec(grader="agent"),
            GraderSpec(grader="agent"),
        ]
    )
    assert "graders[0].pattern='(unclosed' is not a valid regular expression" in problems[0]
    assert problems[1] == "graders[1]: ['url'] do not apply to grader 'numeric'; it takes ['field', 'tolerance']"
    assert "neither on this machine" in problems[2] and "LLM_MCP_REWARD_URLS" in problems[2]
    assert "graders[3].fields is required" in problems[3] and "min_chars=9 is above max_chars=3" in problems[4]
    assert any("two graders are called ['agent']" in p for p in problems) and "at most one agent" in problems[-1]


class _Grader(BaseHTTPRequestHandler):
    """A user's grader on loopback: scores 1 for completions containing the row's answer; modes for failures."""

    mode = "ok"
    calls = 0
    fail_after: int | None = None

    def do_POST(self):
        items = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["items"]
        type(self).calls += 1
        if self.mode == "fail" or (self.fail_after is not None and self.calls > self.fail_after):
            self.send_error(500, "grader crashed")
            return
        if self.mode == "redirect":
            self.send_response(302)
            self.send_header("Location", "http://example.com/")
            self.end_headers()
            return
        if self.mode == "slow":
            threading.Event().wait(3)
        scores = [float(str(it["row"]["answer"]) in it["completion"]) for it in items]
        body = json.dumps({"scores": scores if self.mode != "short" else scores[:-1]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_grader():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Grader)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Grader.mode, _Grader.calls, _Grader.fail_after = "ok", 0, None
    yield f"http://127.0.0.1:{server.server_address[1]}/score", _Grader
    server.shutdown()


def test_the_http_grader_is_bounded(http_grader, monkeypatch):
    url, grader = http_grader
    items = [
        {"prompt": "p", "completion": "7", "row": {"answer": 7}},
        {"prompt": "p", "completion": "3", "row": {"answer": 7}},
    ]
    assert post_batch("mine", url, items, 5) == [1.0, 0.0]
    for mode, error in (
        ("fail", "answered HTTP 500"),
        ("redirect", "answered HTTP 302 (redirect to http://example.com/ refused)"),
        ("short", 'expected {"scores": [2 numbers]}'),
        ("slow", "failed: TimeoutError"),
    ):
        grader.mode = mode
        with pytest.raises(RuntimeError, match=error.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            post_batch("mine", url, items, 1)
    assert url_problem("http://10.0.0.5/score") and url_problem("file:///etc/passwd")
    monkeypatch.setenv("LLM_MCP_REWARD_URLS", "https://grader.internal/score")
    assert (
        url_problem("https://grader.internal/score/v1") is None
        and url_problem("https://grader.internal.evil/") is not None
    )


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_grpo_loss_advantages_and_gradients_match_trl(sharp_model_template, tmp_path, loss_type):
    """TRL's GRPOTrainer as an oracle: the same prompts, fixed completions (its rollout_func) and fixed rewards;
    advantages, loss, KL and the adapter's gradients agree within 1e-5 (KL reference: the adapter disabled)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from llm_mcp.core.jobconfig import GRPOSettings
    from llm_mcp.modeling.encode import IGNORE, collate, tokenizer_for
    from llm_mcp.train.grpo import GRPOObjective
    from llm_mcp.train.rollout import _reference_logps, group_advantages

    tok = tokenizer_for(str(sharp_model_template))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(sharp_model_template), dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=["q_proj", "v_proj"]),
    )
    settings = GRPOSettings(
        num_generations=4, max_new_tokens=8, loss_type=loss_type, kl_coef=0.04, graders=[{"grader": "numeric"}]
    )
    obj = GRPOObjective(settings)
    obj.remember_start([p for p in model.parameters() if p.requires_grad])  # the job's start: the KL reference
    g, prompts = 4, ["Pick a lucky number for ice.", "Pick a lucky number for sea."]  # one length: TRL pads left
    prompt_ids = [tok(p)["input_ids"] for p in prompts]
    gen = torch.Generator().manual_seed(3)
    completions = [
        torch.randint(3, 500, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist() + [2]
        for _ in range(len(prompts) * g)
    ]
    rewards = [1.0, 0.0, 0.5, 0.0, 0.25, 0.0, 1.0, 1.0]

    def rollout_func(batch_prompts, trainer):
        n = len(batch_prompts)
        return {
            "prompt_ids": [prompt_ids[i // g] for i in range(n)],
            "completion_ids": completions[:n],
            "logprobs": [[0.0] * len(c) for c in completions[:n]],
        }

    def reward(prompts, completions, completion_ids, **kwargs):
        return rewards[: len(completions)]

    args = GRPOConfig(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        bf16=False,
        num_generations=g,
        per_device_train_batch_size=len(completions),
        max_completion_length=8,
        loss_type=loss_type,
        beta=0.04,
        epsilon=0.2,
    )
    data = Dataset.from_list([{"prompt": p} for p in prompts] * 4)
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok, rollout_func=rollout_func
    )
    trainer.current_gradient_accumulation_steps = 1  # TRL keeps its reference: a frozen copy of the adapter
    with torch.no_grad():  # training moved the adapter away from where it started
        for name, p in model.named_parameters():
            if ".default." in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    model.train()
    scored = trainer._generate_and_score_completions([{"prompt": prompts[i // g]} for i in range(len(completions))])
    theirs = trainer._compute_loss(trainer.model, scored)
    theirs.backward()
    trainable = [p for n, p in model.named_parameters() if ".default." in n]
    their_grads = [p.grad.clone() for p in trainable]
    model.zero_grad()

    seqs = [
        {"input_ids": prompt_ids[i // g] + c, "labels": [IGNORE] * len(prompt_ids[i // g]) + c}
        for i, c in enumerate(completions)
    ]
    batch = collate(seqs, tok.pad_token_id)
    advantages, _ = group_advantages(torch.tensor(rewards), g, "group")
    batch["advantages"] = advantages
    batch["ref_logps"] = _reference_logps(obj, SimpleNamespace(model=model), batch, "cpu")
    ours = obj.loss_sum(obj.wrap(model), batch) / obj.targets(batch)
    ours.backward()
    metrics = obj.pop_metrics(lambda t: t)
    assert advantages.tolist() == pytest.approx(scored["advantages"].tolist(), abs=1e-5)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    assert metrics["kl"] == pytest.approx(trainer._metrics["train"]["kl"][-1], abs=1e-5) and metrics["kl"] > 1e-3
    assert metrics["clip_fraction"] == trainer._metrics["train"]["clip_ratio/region_mean"][-1] == 0.0
    for mine, reference in zip((p.grad for p in trainable), their_grads):
        assert torch.allclose(mine, reference, atol=1e-5, rtol=1e-4)
    assert max(float(r.abs().max()) for r in their_grads) > 1e-4  # the gradients compared are not all zero


async def _sft(client) -> str:
    started = await client.call_tool("start_finetune", {**SFT, **FAST})
    job = await wait_final(client, started.structured_content["job_id"])
    assert job["state"] == "succeeded", job
    return job["job_id"]


async def _evaluate(client, targets: list[str], graders=NUMERIC) -> list[dict]:
    result = await client.call_tool(
        "evaluate",
        {"targets": targets, "dataset": "data/held_out.jsonl", "graders": graders, "max_tokens": 4, "wait_seconds": 30},
    )
    assert not result.is_error, result.content[0].text
    job = await wait_final(client, result.structured_content["job_id"])
    assert job["state"] == "succeeded", job
    return job["evaluation"]["targets"]


def _steps(state, job_id: str) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(state.store.job_dir(job_id)) if "reward" in m}


async def test_sft_then_grpo_raises_the_held_out_reward_and_resumes_exactly(app, reward_data):
    """The worked example (docs/guide.md): SFT teaches the form (one digit), GRPO with a numeric grader the content
    (the digit the grader wants). Held-out reward: base 0, SFT about 1/8, GRPO >= 0.8. A GRPO job cancelled and
    resumed reproduces the uninterrupted run's rewards and losses step for step."""
    state, server = app
    async with Client(server) as client:
        sft = await _sft(client)
        args = {**GRPO, "init_from": sft, "max_steps": 20, "graders": NUMERIC}
        full = (await client.call_tool("start_finetune", args)).structured_content["job_id"]
        job = await wait_final(client, full)
        status = await client.call_tool("job_status", {"job_id": full, "plot": True})
        interrupted = (await client.call_tool("start_finetune", {**args, "checkpoint_every": 5})).structured_content
        while not [s for s in _steps(state, interrupted["job_id"]) if s >= 8]:
            await anyio.sleep(0.05)
        await client.call_tool("cancel_job", {"job_id": interrupted["job_id"]})
        stopped = await wait_final(client, interrupted["job_id"])
        resumed = await client.call_tool("start_finetune", {**args, "resume_from": interrupted["job_id"]})
        assert not resumed.is_error, resumed.content[0].text
        finished = await wait_final(client, resumed.structured_content["job_id"])
        base, tuned, grpo = await _evaluate(client, ["base", sft, full])
    assert job["state"] == "succeeded" and job["objective"] == "grpo", job
    rewards = job["rewards"]
    assert rewards["first_reward"] <= 0.4 and rewards["reward"] >= 0.8, rewards
    assert rewards["zero_spread"] >= 0.5 and rewards["completion_length"] <= 2.5, rewards  # converged: "7" + end
    text = status.content[0].text
    assert "GRPO reward" in text and "numeric" in text and status.content[-1].type == "image"
    assert job["rollouts"] and {"prompt", "completion", "scores", "reward", "advantage"} <= set(job["rollouts"][0])
    rollouts = (state.store.job_dir(full) / "rollouts.jsonl").read_text().splitlines()
    assert len(rollouts) == 20 * 4 * 8  # steps x prompts x generations
    assert base["reward"] == 0.0 and tuned["reward"] <= 0.4 and grpo["reward"] >= 0.8, (base, tuned, grpo)
    assert grpo["reward_rows"] == 16 and grpo["reward/numeric"] == grpo["reward"]
    stopped_at = stopped["checkpoints"][-1]["step"]
    assert stopped["state"] == "cancelled" and 8 <= stopped_at < 20, stopped
    assert finished["state"] == "succeeded", finished
    a, c = _steps(state, full), _steps(state, resumed.structured_content["job_id"])
    assert sorted(c) == list(range(stopped_at + 1, 21))
    for step in c:
        for key in ("reward", "loss", "completion_length", "reward_std"):
            assert c[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-5), (step, key)


async def test_the_agent_is_the_judge(app, reward_data):
    """A scripted MCP client grades each step's completions with submit_rewards (1 for the digit it wants) and
    the reward rises; when it stops answering, the job pauses with a checkpoint after wait_s, and its late scores
    resume it as a new job that samples the same completions and trains on."""
    state, server = app
    agent = {"grader": "agent", "instructions": f"1 if the answer is {TARGET}, else 0", "wait_s": 10}
    async with Client(server) as client:
        sft = await _sft(client)
        args = {**GRPO, "init_from": sft, "max_steps": 16, "batch_size": 2, "graders": [agent], "learning_rate": 3e-3}
        wrong = await client.call_tool("start_finetune", {**args, "batch_size": 8})
        started = await client.call_tool("start_finetune", args)
        job_id, answered, paused = started.structured_content["job_id"], 0, None
        while True:
            status = (await client.call_tool("job_status", {"job_id": job_id})).structured_content
            job = status["job"]
            pending = job.get("pending_rollouts")
            if job["state"] in ("succeeded", "failed", "cancelled"):
                if job["state"] != "failed" or paused:
                    break
                paused, job_id = job, None  # it waited too long: the late scores resume it
            if not pending:
                await anyio.sleep(0.1)
                continue
            if answered == 6 and not paused:
                await anyio.sleep(1)  # stop answering: the job pauses after wait_s
                continue
            scores = [float(item["completion"].strip() == str(TARGET)) for item in pending["items"]]
            answer = await client.call_tool(
                "submit_rewards",
                {"job_id": paused["job_id"] if job_id is None else job_id, "step": pending["step"], "scores": scores},
            )
            assert not answer.is_error, answer.content[0].text
            answered += 1
            job_id = answer.structured_content.get("resumed_job_id") or job_id
            bad = await client.call_tool(
                "submit_rewards", {"job_id": job_id, "step": pending["step"] + 5, "scores": scores}
            )
            assert (bad.is_error and "give step=" in bad.content[0].text) or "not waiting" in bad.content[0].text
        final = await wait_final(client, job_id)
    assert wrong.is_error and "at most 32" in wrong.content[0].text
    assert paused["state"] == "failed" and "no scores for step 7 within wait_s=10" in paused["error"], paused
    assert "submit_rewards" in paused["next_step"] and paused["checkpoints"][-1]["step"] == 6
    assert final["state"] == "succeeded" and final["resumed_from"] == paused["job_id"], final
    before, after = _steps(state, paused["job_id"]), _steps(state, job_id)
    assert sorted(before) == [1, 2, 3, 4, 5, 6] and sorted(after) == list(range(7, 17))
    rewards = [before[s]["reward"] for s in sorted(before)] + [after[s]["reward"] for s in sorted(after)]
    assert rewards[0] <= 0.3 and sum(rewards[-4:]) / 4 >= 0.8, rewards


async def test_a_users_http_grader_trains_and_its_failure_fails_the_step_with_a_checkpoint(
    app, reward_data, http_grader
):
    """The user's grader on loopback scores every step; when it starts failing, the job ends failed with its cause
    and a checkpoint of the steps done, and resume_from continues once it is fixed."""
    state, server = app
    url, grader = http_grader
    grader.fail_after = 3
    args = {**GRPO, "max_steps": 6, "num_generations": 4, "graders": [{"grader": "http", "url": url}, *NUMERIC]}
    async with Client(server) as client:
        refused = await client.call_tool(
            "start_finetune", {**args, "graders": [{"grader": "http", "url": "http://203.0.113.9/score"}]}
        )
        failed = await wait_final(client, (await client.call_tool("start_finetune", args)).structured_content["job_id"])
        grader.fail_after = None
        resumed = await client.call_tool("start_finetune", {**args, "resume_from": failed["job_id"]})
        finished = await wait_final(client, resumed.structured_content["job_id"])
    assert refused.is_error and "neither on this machine" in refused.content[0].text
    assert failed["state"] == "failed" and "answered HTTP 500" in failed["error"], failed
    assert [c["step"] for c in failed["checkpoints"]] == [3] and "resume_from" in failed["next_step"]
    assert finished["state"] == "succeeded", finished
    rollouts = [json.loads(line) for line in (state.store.job_dir(failed["job_id"]) / "rollouts.jsonl").open()]
    assert len(rollouts) == 3 * 4 * 4 and all(set(r["scores"]) == {"http", "numeric"} for r in rollouts)
    assert all(r["scores"]["http"] == float(str(TARGET) in r["completion"]) for r in rollouts)


async def test_grpo_arguments_are_checked(app, reward_data):
    _, server = app
    base = dict(model="models/tiny", method="lora", objective="grpo", dataset="data/prompts.jsonl", dry_run=True)
    async with Client(server) as client:

        async def problems(**args) -> str:
            result = await client.call_tool("start_finetune", {**base, **args})
            assert result.is_error
            return result.content[0].text

        assert "graders is required with objective='grpo'" in await problems()
        text = await problems(graders=[{"grader": "vibes"}])
        assert "graders.0.grader='vibes'; allowed: ['exact_match', 'contains', 'regex'" in text
        assert "graders is required" not in text
        assert "is not a valid regular expression" in await problems(graders=[{"grader": "regex", "pattern": "[a-"}])
        assert "train_on does not apply to objective='grpo'" in await problems(graders=NUMERIC, train_on="all")
        assert "score held-out prompts with evaluate" in await problems(graders=NUMERIC, eval_fraction=0.1)
        assert "num_generations=1 is out of range" in await problems(graders=NUMERIC, num_generations=1)
        assert "leaves no room for the prompt in max_seq_len=64" in await problems(
            graders=NUMERIC, max_seq_len=64, max_new_tokens=64
        )
        assert "temperature=0.0 is out of range" in await problems(graders=NUMERIC, temperature=0.0)
        assert "loss_type='ppo'; allowed: ['dapo', 'grpo', 'dr_grpo']" in await problems(
            graders=NUMERIC, loss_type="ppo"
        )
        sft_rows = await problems(graders=NUMERIC, dataset="data/sft.jsonl")
        assert "a messages row in a GRPO job; objective='grpo' trains on prompts" in sft_rows
        prompt_rows = await problems(objective="causal_lm")
        assert (
            "a prompt row with no 'completion' in a causal_lm job" in prompt_rows and "objective='grpo'" in prompt_rows
        )
        assert "only apply to objective='grpo'" in await problems(
            objective="causal_lm", dataset="data/sft.jsonl", num_generations=4
        )
        small = await client.call_tool("start_finetune", {**base, "graders": NUMERIC, "num_generations": 2})
        big = await client.call_tool("start_finetune", {**base, "graders": NUMERIC, "num_generations": 32})
    cfg = small.structured_content["config"]["grpo"]
    assert cfg["loss_type"] == "dapo" and cfg["epsilon"] == 0.2 and cfg["kl_coef"] == 0.0 and cfg["temperature"] == 1.0
    assert cfg["max_new_tokens"] == 256 and cfg["scale_rewards"] == "group"
    assert cfg["graders"][0]["grader"] == "numeric" and cfg["graders"][0]["tolerance"] == 1e-6
    assert "GRPO (2 generations, reward numeric)" in small.content[0].text
    assert big.structured_content["estimates"]["memory_gb"] > small.structured_content["estimates"]["memory_gb"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, extra",
    [("qlora", {}), ("dora", {}), ("sparse", {"density": 0.05, "learning_rate": 1e-2}), ("lora", {"num_processes": 2})],
)
async def test_grpo_trains_with_every_method_and_two_processes(app, reward_data, method, extra):
    """Each method (and 2-process data parallel) runs GRPO from its SFT start and raises the reward."""
    state, server = app
    async with Client(server) as client:
        sft = await client.call_tool("start_finetune", {**SFT, **FAST, "method": method, **extra})
        sft_job = await wait_final(client, sft.structured_content["job_id"])
        args = {**GRPO, "method": method, "init_from": sft_job["job_id"], "max_steps": 12, "graders": NUMERIC, **extra}
        args.pop("density", None)
        started = await client.call_tool("start_finetune", args)
        assert not started.is_error, started.content[0].text
        job = await wait_final(client, started.structured_content["job_id"])
    assert sft_job["state"] == "succeeded" and job["state"] == "succeeded", job
    steps = _steps(state, job["job_id"])
    assert max(s["reward"] for s in steps.values()) > steps[1]["reward"] + 0.2, [s["reward"] for s in steps.values()]
    rollouts = (state.store.job_dir(job["job_id"]) / "rollouts.jsonl").read_text().splitlines()
    assert len(rollouts) == 12 * 4 * 8 * extra.get("num_processes", 1)  # every process's rollouts are kept
