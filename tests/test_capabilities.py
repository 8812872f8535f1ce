"""``models.<id>.capabilities``: validated as llama-swap does, told to clients in
``/v1/models`` (llama-swap's shape) and in ``/api/models`` rows, applied in
place by a reload (docs/configuration.md, docs/api.md#capabilities)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.conftest import chat, free_port, running
from trio_swap.cli import _check as check_command
from trio_swap.config import ConfigError, load_config
from trio_swap.config.diff import diff_configs
from trio_swap.config.model import Capabilities
from trio_swap.http.capabilities import capability_fields

PYTHON = sys.executable


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def with_caps(block: str, *, extra: str = "") -> str:
    """One model (line 2 is its id, line 4 ``capabilities:``) with ``block`` indented under it."""
    body = "".join(f"      {line}\n" for line in block.splitlines())
    return f"{extra}models:\n  m:\n    cmd: s ${{PORT}}\n    capabilities:\n{body}"


# --- validation ------------------------------------------------------------------------


def test_a_full_block_loads(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            with_caps(
                "in: [text, image, text]\nout: [text]\ntools: true\nreranker: false\n"
                "context: ${CTX}",
                extra="macros:\n  CTX: 32768\n",
            ),
        )
    )
    assert config.models["m"].capabilities == Capabilities(
        inputs=("text", "image"), outputs=("text",), tools=True, context=32768
    )
    assert not any("capabilities" in warning for warning in config.warnings)


def test_no_block_and_empty_keys_mean_no_capabilities(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, with_caps("in:\nout:\ntools:\ncontext:")))
    assert not config.models["m"].capabilities
    assert (
        load_config(write(tmp_path, "models:\n  m:\n    cmd: s ${PORT}\n")).models["m"].capabilities
        == Capabilities()
    )


@pytest.mark.parametrize(
    ("block", "key_path", "line", "fragment"),
    [
        ("in: text", "models.m.capabilities.in", 5, "must be a list of text, audio, image"),
        ("in: [text, video]", "models.m.capabilities.in[1]", 5, "unknown modality 'video'"),
        ("out:\n  - text\n  - Image", "models.m.capabilities.out[1]", 7, "unknown modality"),
        ("out: [1]", "models.m.capabilities.out[0]", 5, "must be a modality (got int)"),
        ("out: {text: true}", "models.m.capabilities.out", 5, "got mapping"),
        ("tools: yes", "models.m.capabilities.tools", 5, "must be true or false (got string"),
        ("tools: 1", "models.m.capabilities.tools", 5, "must be true or false (got int 1)"),
        ("reranker: 'true'", "models.m.capabilities.reranker", 5, "must be true or false"),
        ("context: -1", "models.m.capabilities.context", 5, "must be >= 0 (got -1)"),
        ("context: 4096.5", "models.m.capabilities.context", 5, "whole number of tokens"),
        ("context: 32k", "models.m.capabilities.context", 5, "got string '32k'"),
        ("context: true", "models.m.capabilities.context", 5, "got bool"),
        ("context: 99999999999999999999", "models.m.capabilities.context", 5, "64 bits"),
        ("in: ['${nope}']", "models.m.capabilities.in[0]", 5, "unknown macro '${nope}'"),
    ],
)
def test_every_bad_value_is_a_located_error(
    tmp_path: Path, block: str, key_path: str, line: int, fragment: str
) -> None:
    path = write(tmp_path, with_caps(block))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert (err.source, err.key_path, err.line) == (str(path), key_path, line), str(err)
    assert fragment in err.message, str(err)


def test_a_block_that_is_not_a_mapping_is_a_located_error(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  m:\n    cmd: s ${PORT}\n    capabilities: [text]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.key_path, info.value.line) == ("models.m.capabilities", 4)
    assert "expected mapping | null, got list" in info.value.message


def test_an_unknown_key_in_the_block_is_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, with_caps("in: [text]\nvision: true"))
    config = load_config(path)
    assert config.warnings == (
        f"{path}:6: models.m.capabilities.vision: unknown key "
        "(known: in, out, tools, reranker, context); ignored",
    )
    assert config.models["m"].capabilities == Capabilities(inputs=("text",))


def test_check_exits_2_on_a_bad_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, with_caps("context: -5"))
    assert check_command(str(path)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:5: models.m.capabilities.context: must be >= 0")
    result = subprocess.run(
        [PYTHON, "-m", "trio_swap", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "models.m.capabilities.context" in result.stderr


# --- the /v1/models shape -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caps", "fields"),
    [
        (Capabilities(), {}),
        (Capabilities(reranker=True), {"capabilities": {"reranker": True}}),
        (
            Capabilities(inputs=("text",), outputs=("image",)),
            {
                "architecture": {
                    "input_modalities": ["text"],
                    "output_modalities": ["image"],
                    "modality": "text->image",
                },
                "capabilities": {"image_generation": True},
            },
        ),
        (
            Capabilities(inputs=("text",), outputs=("audio",)),
            {
                "architecture": {
                    "input_modalities": ["text"],
                    "output_modalities": ["audio"],
                    "modality": "text->audio",
                },
                "capabilities": {"audio_speech": True},
            },
        ),
        (
            Capabilities(inputs=("audio",), outputs=("text",)),
            {
                "architecture": {
                    "input_modalities": ["audio"],
                    "output_modalities": ["text"],
                    "modality": "audio->text",
                },
                "capabilities": {"audio_transcriptions": True},
            },
        ),
        (
            Capabilities(inputs=("image",), outputs=("image",)),
            {
                "architecture": {
                    "input_modalities": ["image"],
                    "output_modalities": ["image"],
                    "modality": "image->image",
                },
                "capabilities": {"image_generation": True, "image_to_image": True},
            },
        ),
    ],
)
def test_llama_swaps_published_examples(caps: Capabilities, fields: dict[str, object]) -> None:
    # The image_gen, speech_to_text, transcription and reranker models of
    # llama-swap's release notes (v225), and the empty block (no fields at all).
    assert capability_fields(caps) == fields


def responder(model_id: str, block: str = "", *, extra: str = "") -> str:
    text = (
        f"  {model_id}:\n"
        f"    cmd: {PYTHON} -m trio_swap responder --port ${{PORT}} --model ${{MODEL_ID}}\n"
        f"{extra}"
    )
    if block:
        text += "    capabilities:\n" + "".join(f"      {line}\n" for line in block.splitlines())
    return text


def config_text(start: int, vision_block: str) -> str:
    return (
        f"healthCheckTimeout: 30\nstartPort: {start}\nincludeAliasesInList: true\nmodels:\n"
        + responder(
            "vision",
            vision_block,
            extra="    aliases: [eyes]\n"
            "    metadata: {family: qwen, context_length: 1, capabilities: x, n_ctx: 7}\n",
        )
        + responder("plain", extra="    metadata: {context_length: 2048}\n")
    )


VISION = "in: [text, image]\nout: [text]\ntools: true\ncontext: 32768"


async def test_v1_models_and_api_models_through_a_real_serve_and_a_reload(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, config_text(free_port(), VISION))
    with trio.fail_after(30):
        async with running(load_config(path), config_path=path) as h:
            answer = await h.client.post("/v1/chat/completions", json=chat("vision"))
            assert answer.status_code == 200, answer.text
            listing = {e["id"]: e for e in (await h.client.get("/v1/models")).json()["data"]}
            vision = listing["vision"]
            assert vision["architecture"] == {
                "input_modalities": ["text", "image"],
                "output_modalities": ["text"],
                "modality": "text+image->text",
            }
            assert vision["capabilities"] == {"vision": True, "function_calling": True}
            assert vision["supported_parameters"] == ["tools", "tool_choice"]
            assert vision["context_length"] == 32768
            # The block's fields win: metadata keys of the same names are dropped.
            assert vision["meta"] == {
                "llamaswap": {"family": "qwen", "n_ctx": 7, "type": "model", "aliases": ["eyes"]},
                "n_ctx": 32768,
            }
            assert vision["status"] == {"value": "loaded"}
            assert listing["eyes"]["capabilities"] == vision["capabilities"]
            # No block: no capability fields, metadata passed through untouched.
            plain = listing["plain"]
            assert not {"architecture", "capabilities", "context_length"} & set(plain)
            assert plain["meta"] == {
                "llamaswap": {"context_length": 2048, "type": "model", "aliases": []}
            }

            rows = await h.models()
            assert rows["vision"]["capabilities"] == {
                "in": ["text", "image"],
                "out": ["text"],
                "tools": True,
                "reranker": False,
                "context": 32768,
            }
            assert rows["plain"]["capabilities"] == {
                "in": [],
                "out": [],
                "tools": False,
                "reranker": False,
                "context": 0,
            }

            # A reload changing the block restarts nothing: same process, new listing.
            pid = h.pid("vision")
            start = load_config(path).start_port
            write(tmp_path, config_text(start, "in: [audio]\nout: [text]\nreranker: true"))
            report = (await h.client.post("/api/config/reload")).json()
            assert (report["changed"], report["restart"]) == (["vision"], [])
            assert h.pid("vision") == pid
            vision = {e["id"]: e for e in (await h.client.get("/v1/models")).json()["data"]}[
                "vision"
            ]
            assert vision["capabilities"] == {"audio_transcriptions": True, "reranker": True}
            assert "context_length" not in vision
            row = (await h.models())["vision"]
            assert row["capabilities"] == {
                "in": ["audio"],
                "out": ["text"],
                "tools": False,
                "reranker": True,
                "context": 0,
            }


def test_a_capabilities_change_is_not_a_process_change(tmp_path: Path) -> None:
    start = free_port()
    old = load_config(write(tmp_path, config_text(start, VISION)))
    new = load_config(write(tmp_path, config_text(start, "in: [text]")))
    diff = diff_configs(old, new)
    assert (diff.changed, diff.restart) == (("vision",), ())
