"""The user's data where the user keeps it: folders allowed when asked (MCP elicitation) or by configuration,
secrets never read, and an agent that trains on the user's own Alpaca file in at most six calls."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp_types import ElicitResult

from tests.conftest import Agent, server_env

pytestmark = [pytest.mark.anyio]

TICKETS = [
    ("My invoice is wrong", "billing"),
    ("The app crashes on start", "bug"),
    ("How do I change my password", "account"),
    ("I was charged twice", "billing"),
]
ALPACA = [
    {"instruction": "Route this support ticket to a team.", "input": text, "output": team} for text, team in TICKETS
] * 8
HELD_OUT = [{"ticket": f"Route this support ticket to a team.\n\n{text}", "expected": team} for text, team in TICKETS]


def user_folder(tmp_path: Path) -> Path:
    """The user's own folder, outside every allowed root: the Alpaca file and a held-out file with their own keys."""
    folder = tmp_path / "Documents" / "support"
    folder.mkdir(parents=True)
    (folder / "tickets.json").write_text(json.dumps(ALPACA))
    (folder / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HELD_OUT))
    return folder


class User:
    """Answers the server's questions the way a user in Claude Desktop would, and remembers what was asked."""

    def __init__(self, allow: bool | None):
        self.allow, self.asked = allow, []

    async def __call__(self, context, params):
        self.asked.append(params.message)
        if self.allow is None:
            return ElicitResult(action="cancel")
        return ElicitResult(action="accept", content={"allow": self.allow})


async def test_an_agent_trains_on_the_users_alpaca_file_in_their_folder_in_six_calls(home, tiny_model, tmp_path):
    folder = user_folder(tmp_path)
    user = User(allow=True)
    params = StdioServerParameters(command=sys.executable, args=["-m", "llm_mcp", "serve"], env=server_env(home))
    async with Client(params, elicitation_callback=user) as client:
        call = Agent(client)
        listed = await call("list_models", {"fits": True})  # 1
        model = next(c["path"] for c in listed["local"] if c.get("model"))
        assert listed["allowed_roots"] == [str(home)]
        inspected = await call("datasets", {"path": str(folder / "tickets.json"), "model": model})  # 2: asks the user
        assert len(user.asked) == 1 and str(folder) in user.asked[0]
        assert inspected["usable"] and inspected["formats"] == {"alpaca": 32}
        assert "[[billing" in inspected["preview"] or "[[ billing" in inspected["preview"], inspected["preview"]
        job = await call(
            "start_finetune",
            {
                "model": model,
                "method": "lora",
                "dataset": str(folder / "tickets.json"),
                "max_steps": 30,
                "learning_rate": 5e-3,
                "max_seq_len": 64,
            },
        )  # 3
        status = (await call("job_status", {"job_id": job["job_id"], "wait_seconds": 30}))["job"]  # 4
        while status["state"] not in ("succeeded", "failed", "cancelled"):  # only on a slow machine
            status = (await call("job_status", {"job_id": job["job_id"], "wait_seconds": 30}))["job"]
        assert status["state"] == "succeeded", status
        scored = await call(
            "evaluate",
            {
                "targets": ["base", job["job_id"]],
                "dataset": str(folder / "held_out.jsonl"),
                "columns": {"prompt": "ticket", "completion": "expected"},
                "max_tokens": 4,
                "wait_seconds": 30,
            },
        )  # 5
        assert scored["job"]["state"] == "succeeded", scored
        worst = scored["job"]["worst_rows"]
        assert worst and {"input", "expected", "got"} <= set(worst[0]), worst
        assert {r["input"].split("\n\n")[-1] for r in worst} <= {t for t, _ in TICKETS}
        sampled = await call(
            "sample", {"job_id": job["job_id"], "prompt": ALPACA[0]["instruction"], "max_tokens": 4}
        )  # 6
        assert sampled["completions"][0]["completion_tokens"] > 0
    assert call.calls <= 6, call.calls
    assert len(user.asked) == 1  # the folder is remembered: training and evaluation did not ask again
    assert json.loads((home / "allowed_folders.json").read_text()) == [str(folder.resolve())]


async def test_a_client_that_cannot_ask_gets_the_configuration_line(app, home, tmp_path):
    _, server = app
    folder = user_folder(tmp_path)
    async with Client(server) as client:
        r = await client.call_tool("datasets", {"path": str(folder / "tickets.json")})
    text = r.content[0].text
    assert r.is_error and "outside the allowed roots" in text
    assert f'"LLM_MCP_ALLOWED_ROOTS": "{folder.resolve()}"' in text and "claude_desktop_config.json" in text
    assert f"--allow-root {folder.resolve()}" in text and "claude mcp add" in text
    assert not (home / "allowed_folders.json").exists()


@pytest.mark.parametrize("answer", [False, None], ids=["declined", "cancelled"])
async def test_a_user_who_does_not_allow_the_folder_is_not_asked_to_repeat_and_nothing_is_read(
    app, home, tmp_path, answer
):
    _, server = app
    folder = user_folder(tmp_path)
    user = User(allow=answer)
    async with Client(server, elicitation_callback=user) as client:
        r = await client.call_tool("datasets", {"path": str(folder / "tickets.json")})
    assert r.is_error and len(user.asked) == 1
    text = r.content[0].text
    assert ("did not allow" in text) if answer is False else ("closed the question" in text), text
    assert "nothing was read" in text
    assert not (home / "allowed_folders.json").exists()


async def test_secrets_system_folders_and_the_state_internals_are_never_offered(app, home, tmp_path, monkeypatch):
    _, server = app
    user_home = tmp_path / "user"
    (user_home / ".ssh").mkdir(parents=True)
    (user_home / ".ssh" / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (user_home / "notes.jsonl").write_text('{"text": "hello"}\n')
    project = tmp_path / "project"
    project.mkdir()
    (project / ".env").write_text("OPENAI_API_KEY=sk-secret\n")
    monkeypatch.setenv("HOME", str(user_home))
    user = User(allow=True)
    async with Client(server, elicitation_callback=user) as client:
        for path, why in [
            (user_home / ".ssh" / "id_ed25519", "credentials and keys are never read"),
            (user_home / "notes.jsonl", f"it holds {user_home / '.ssh'}"),  # the folder holding ~/.ssh
            (project / ".env", "credentials file"),
            (Path("/etc/hostname"), "system directory"),
        ]:
            r = await client.call_tool("datasets", {"path": str(path)})
            assert r.is_error and why in r.content[0].text, (path, r.content[0].text)
    assert user.asked == []  # never offered
    assert not (home / "allowed_folders.json").exists()


async def test_a_remembered_folder_keeps_secrets_out_and_survives_a_restart(home, tmp_path, settings):
    from llm_mcp.core.folders import remember
    from llm_mcp.core.settings import Settings, data_path

    folder = user_folder(tmp_path)
    (folder / ".env").write_text("TOKEN=1\n")
    remember(home, folder.resolve())
    restarted = Settings(home=home, models_path=data_path("models.yaml"))
    assert folder.resolve() in restarted.roots
    assert restarted.check_path(folder / "tickets.json", "dataset") == (folder / "tickets.json").resolve()
    from llm_mcp.core.errors import PathNotAllowedError

    with pytest.raises(PathNotAllowedError, match="credentials file"):
        restarted.check_path(folder / ".env", "dataset")
    (home / "allowed_folders.json").write_text("{not json")  # a damaged file allows nothing, and breaks nothing
    assert Settings(home=home, models_path=data_path("models.yaml")).roots == [home.resolve()]


# --- Hub datasets by id, from a local Hugging Face cache laid out as huggingface_hub lays it out ----------------

OLD, NEW = "1" * 40, "2" * 40
CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train.jsonl
  - split: test
    path: data/test.jsonl
- config_name: chat
  data_files:
  - split: train
    path: chat/train.jsonl
---
# acme/tickets
"""


def hub_cache(root: Path) -> Path:
    """A Hugging Face hub cache holding acme/tickets at two commits: OLD (tag v1: 8 rows) and NEW (main: 32 rows),
    each with an Alpaca 'default' subset (train, test) and a ShareGPT 'chat' subset; files are blobs linked from
    the snapshots, as huggingface_hub stores them."""
    import hashlib
    import os

    repo = root / "datasets--acme--tickets"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()

    def add(sha: str, rel: str, data: bytes) -> None:
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / sha / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))

    def jsonl(rows) -> bytes:
        return "".join(json.dumps(r) + "\n" for r in rows).encode()

    chat = [{"conversations": [{"from": "human", "value": t}, {"from": "gpt", "value": team}]} for t, team in TICKETS]
    for sha, n in ((OLD, 8), (NEW, 32)):
        add(sha, "README.md", CARD.encode())
        add(sha, "data/train.jsonl", jsonl(ALPACA[:n]))
        add(sha, "data/test.jsonl", jsonl(ALPACA[:4]))  # a config's splits share one schema
        add(sha, "chat/train.jsonl", jsonl(chat * 2))
    (repo / "refs" / "main").write_text(NEW)
    (repo / "refs" / "v1").write_text(OLD)
    return root


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    cache = hub_cache(tmp_path / "hf-cache")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded: the cache is all there is
    return cache


async def test_a_hub_dataset_by_id_is_pinned_to_its_commit(app, home, tiny_model, hub):
    _, server = app
    base = dict(model="models/tiny", method="lora", dataset="hf:acme/tickets", max_seq_len=64, dry_run=True)
    async with Client(server) as client:

        async def run(**extra):
            r = await client.call_tool("start_finetune", {**base, **extra})
            return r, r.content[0].text

        r, text = await run()
        assert not r.is_error, text
        hub_ref = r.structured_content["config"]["dataset_hub"]
        assert hub_ref == {"repo": "acme/tickets", "revision": NEW, "subset": None, "split": "train"}
        r, text = await run(revision="v1")
        assert r.structured_content["config"]["dataset_hub"]["revision"] == OLD, text
        r, text = await run(subset="chat")
        assert not r.is_error and r.structured_content["config"]["dataset_hub"]["subset"] == "chat", text
        inspected = await client.call_tool("datasets", {"path": "hf:acme/tickets", "split": "test"})
        assert not inspected.is_error and "rows" in inspected.structured_content, inspected.content[0].text
        assert inspected.structured_content["rows"] == 4 and inspected.structured_content["formats"] == {"alpaca": 4}
        old = await client.call_tool("datasets", {"path": "hf:acme/tickets", "revision": "v1"})
        assert old.structured_content["rows"] == 8, old.content[0].text

        for extra, fragments in [
            (dict(split="validation"), ["no split 'validation'", "['train', 'test']"]),
            (dict(subset="fr"), ["subset='fr'", "chat"]),
            (
                dict(revision="v9"),
                ["not in the Hugging Face cache", "HF_HUB_OFFLINE", "hf download --repo-type dataset"],
            ),
            (dict(dataset="hf:acme/missing"), ["hf:acme/missing is not in the Hugging Face cache"]),
            (dict(dataset="hf:not a repo"), ["not a Hub dataset id", "hf:ORG/NAME"]),
            (dict(dataset="data/x.jsonl", split="test"), ["split='test'", "is a file, so drop them"]),
        ]:
            r, text = await run(**extra)
            assert r.is_error and all(f in text for f in fragments), (extra, text)


@pytest.mark.slow
async def test_a_job_trains_and_evaluates_on_the_pinned_hub_commit_offline(app, home, tiny_model, hub):
    from tests.conftest import wait_final

    _, server = app
    async with Client(server) as client:
        args = dict(model="models/tiny", method="lora", dataset="hf:acme/tickets", revision="v1", max_steps=4,
                    max_seq_len=256, batch_size=2, checkpoint_every=0)  # fmt: skip
        started = await client.call_tool("start_finetune", args)
        assert not started.is_error, started.content[0].text
        job_id = started.structured_content["job_id"]
        (hub / "datasets--acme--tickets" / "refs" / "v1").write_text(NEW)  # the tag moves on; the job does not
        final = await wait_final(client, job_id)
        assert final["state"] == "succeeded", final
        log = [json.loads(x) for x in (home / "jobs" / job_id / "metrics.jsonl").read_text().splitlines()]
        start = next(e for e in log if e.get("event") == "start")
        assert start["examples"] == 8, start  # OLD's 8 rows, not NEW's 32
        scored = await client.call_tool(
            "evaluate", {"targets": [job_id], "dataset": "hf:acme/tickets", "split": "test", "max_tokens": 2}
        )
        assert not scored.is_error, scored.content[0].text
        final = await wait_final(client, scored.structured_content["job_id"])
        assert final["state"] == "succeeded" and final["worst_rows_total"] == 4, final


# --- save_dataset(source=...): the user's file or a Hub dataset imported as the rows training reads ------------


async def test_the_users_file_is_imported_as_canonical_rows_with_bad_rows_by_line(app, home, tmp_path):
    from llm_mcp.core.folders import remember

    _, server = app
    folder = user_folder(tmp_path)
    remember(home, folder.resolve())
    messy = folder / "messy.jsonl"
    messy.write_text("".join(json.dumps(r) + "\n" for r in HELD_OUT[:2]) + '{"ticket": 1}\nnot json\n')
    async with Client(server) as client:
        r = await client.call_tool("save_dataset", {"name": "tickets", "source": str(folder / "tickets.json")})
        assert not r.is_error, r.content[0].text
        done = r.structured_content
        assert done["state"] == "done" and done["rows_written"] == 32 and done["formats"] == {"alpaca": 32}
        rows = [json.loads(x) for x in (home / "data" / "tickets.jsonl").read_text().splitlines()]
        assert rows[0] == {"messages": [
            {"role": "user", "content": f"{ALPACA[0]['instruction']}\n{ALPACA[0]['input']}"},
            {"role": "assistant", "content": ALPACA[0]["output"]},
        ]}  # fmt: skip
        again = await client.call_tool("save_dataset", {"name": "tickets", "source": str(folder / "tickets.json")})
        assert again.structured_content["total_rows"] == 32  # the same import again: its result, nothing twice

        mapping = {"prompt": "ticket", "completion": "expected"}
        args = {"name": "held-out", "source": str(messy), "columns": mapping}
        refused = await client.call_tool("save_dataset", args)
        text = refused.content[0].text
        assert refused.is_error and "2 bad row(s) of 4" in text and "nothing was written" in text, text
        assert "line 3:" in text and "line 4: invalid JSON" in text and "skip_bad_rows=true" in text
        assert not (home / "data" / "held-out.jsonl").exists()
        kept = await client.call_tool("save_dataset", {**args, "skip_bad_rows": True})
        assert kept.structured_content["rows_written"] == 2 and kept.structured_content["skipped_rows"] == 2
        rows = [json.loads(x) for x in (home / "data" / "held-out.jsonl").read_text().splitlines()]
        assert rows[0] == {"prompt": HELD_OUT[0]["ticket"], "completion": HELD_OUT[0]["expected"]}

        exists = await client.call_tool("save_dataset", {"name": "tickets", "source": str(messy), "columns": mapping})
        assert exists.is_error and "already exists" in exists.content[0].text
        both = await client.call_tool("save_dataset", {"name": "x", "source": str(messy), "rows": [{"text": "a"}]})
        assert both.is_error and "not both" in both.content[0].text
    left = sorted(p.name for p in (home / "data").iterdir())
    assert left == [".imports", "held-out.jsonl", "tickets.jsonl"]  # no temporary files or locks left


async def test_a_hub_dataset_is_imported_from_the_cache_and_an_uncached_one_refused_offline(app, home, hub):
    _, server = app
    async with Client(server) as client:
        r = await client.call_tool("save_dataset", {"name": "chat", "source": "hf:acme/tickets", "subset": "chat"})
        assert not r.is_error, r.content[0].text
        assert r.structured_content["formats"] == {"sharegpt": 8} and NEW[:12] in r.structured_content["source"]
        r = await client.call_tool("save_dataset", {"name": "gone", "source": "hf:acme/elsewhere"})
        assert (
            r.is_error
            and "HF_HUB_OFFLINE" in r.content[0].text
            and "not in the Hugging Face cache" in r.content[0].text
        )


@pytest.mark.slow
async def test_a_large_import_runs_in_the_background_and_never_blocks_the_server(app, home, tmp_path, monkeypatch):
    from llm_mcp.core import importer
    from llm_mcp.core.folders import remember

    _, server = app
    monkeypatch.setattr(importer, "IMPORT_WAIT_S", 1.0)  # this server's calls wait 1 s for an import, not 20
    big = tmp_path / "big" / "alpaca.jsonl"
    big.parent.mkdir()
    line = json.dumps(ALPACA[0] | {"output": "billing " * 200}) + "\n"
    with open(big, "w") as fh:
        fh.write(line * 200_000)  # ~340 MB
    remember(home, big.parent.resolve())
    async with Client(server) as client:
        args = {"name": "big", "source": str(big)}
        t0 = anyio.current_time()
        first = await client.call_tool("save_dataset", args)
        assert anyio.current_time() - t0 < 10, "the call waited for the whole import"
        assert first.structured_content["state"] == "running", first.content[0].text
        other = await client.call_tool("save_dataset", {"name": "big", "source": str(folder_file(tmp_path))})
        assert other.is_error and "another import into big.jsonl is running" in other.content[0].text
        t0 = anyio.current_time()
        listed = await client.call_tool("datasets", {})
        assert not listed.is_error and anyio.current_time() - t0 < 5  # the server answers meanwhile
        while (r := await client.call_tool("save_dataset", args)).structured_content["state"] == "running":
            progress = r.structured_content["progress"]
            assert progress["state"] in ("starting", "converting") and progress["rows"] >= 0
        assert r.structured_content["rows_written"] == 200_000, r.content[0].text
    assert (home / "data" / "big.jsonl").stat().st_size > 300 << 20


def folder_file(tmp_path: Path) -> Path:
    small = tmp_path / "big" / "small.jsonl"
    small.write_text(json.dumps(ALPACA[0]) + "\n")
    return small


@pytest.mark.slow
@pytest.mark.reliability
async def test_an_import_that_fills_the_disk_leaves_nothing_half_written(app, home, tmp_path):
    from llm_mcp.core.folders import remember
    from tests.test_nothing_lost import small_disk

    _, server = app
    src = tmp_path / "src" / "alpaca.jsonl"
    src.parent.mkdir()
    src.write_text((json.dumps(ALPACA[0] | {"output": "x" * 2000}) + "\n") * 4000)  # ~8 MB
    remember(home, src.parent.resolve())
    with small_disk(home / "data", "4m") as data:
        (data / "keep.jsonl").write_text(json.dumps({"text": "the user's earlier data"}) + "\n")
        async with Client(server) as client:
            r = await client.call_tool("save_dataset", {"name": "big", "source": str(src)})
            r2 = await client.call_tool("save_dataset", {"name": "keep", "source": str(src), "mode": "append"})
        assert r.is_error and "No space left on device" in r.content[0].text, r.content[0].text
        assert r2.is_error and "No space left on device" in r2.content[0].text, r2.content[0].text
        left = sorted(p.name for p in data.iterdir() if p.name != ".imports")
        assert left == ["keep.jsonl"], left
        assert (data / "keep.jsonl").read_text() == json.dumps({"text": "the user's earlier data"}) + "\n"


# --- ShareGPT, tool-call and reasoning rows through the tools ------------------------------------------------

MIXED = [
    {"conversations": [{"from": "human", "value": t}, {"from": "gpt", "value": team}]} for t, team in TICKETS
] + [
    {"tools": [{"type": "function", "function": {"name": "route", "parameters": {
        "type": "object", "properties": {"team": {"type": "string"}}}}}],
     "messages": [{"role": "user", "content": t},
                  {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                      "name": "route", "arguments": {"team": team}}}]},
                  {"role": "tool", "content": "routed"},
                  {"role": "assistant", "content": f"Sent to {team}."}]}
    for t, team in TICKETS
] + [
    {"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": f"<think>It is about {team}.</think>"
                                                  f"{team}"}]}
    for t, team in TICKETS
]  # fmt: skip


@pytest.mark.slow
async def test_sharegpt_tool_call_and_reasoning_rows_train_on_a_model_whose_template_renders_them(app, home, tmp_path):
    from llm_mcp.tiny import make_tiny_model

    _, server = app
    make_tiny_model(home / "models" / "qwen-chat", chat_family="qwen3")
    make_tiny_model(home / "models" / "plain")  # a ChatML template without tool support
    (home / "data").mkdir()
    (home / "data" / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MIXED * 2))
    async with Client(server) as client:
        looked = await client.call_tool("datasets", {"path": "data/mixed.jsonl", "model": "models/qwen-chat",
                                                     "preview_row": 5})  # fmt: skip
        seen = looked.structured_content
        assert seen["usable"] and seen["formats"] == {"sharegpt": 8, "messages": 16}, looked.content[0].text
        assert (
            '[[<tool_call>\n{"name": "route", "arguments": {"team": "billing"}}\n</tool_call><|im_end|>]]'
            in (seen["preview"])
        ), seen["preview"]
        assert "[[routed" not in seen["preview"] and "routed" in seen["preview"]  # the tool's result: context only
        plain = await client.call_tool("datasets", {"path": "data/mixed.jsonl", "model": "models/plain"})
        assert plain.structured_content["usable"] is False
        assert "8 row(s) cannot be rendered" in plain.structured_content["problems"][0]
        refused = await client.call_tool(
            "start_finetune", {"model": "models/plain", "method": "lora", "dataset": "data/mixed.jsonl"}
        )
        assert refused.is_error and "no tool support" in refused.content[0].text
        args = dict(model="models/qwen-chat", method="lora", dataset="data/mixed.jsonl", max_steps=3, batch_size=2,
                    max_seq_len=256, train_reasoning=False, checkpoint_every=0)  # fmt: skip
        started = await client.call_tool("start_finetune", args)
        assert not started.is_error, started.content[0].text
        from tests.conftest import wait_final

        final = await wait_final(client, started.structured_content["job_id"])
        assert final["state"] == "succeeded", final
