import pytest

from rm_lightning import BackboneError
from rm_lightning.models.backbones import load_backbone
from rm_lightning.pairs import chat_formatter


def test_tiny_backbone_is_deterministic_and_padded():
    model_a, tokenizer = load_backbone("tiny-llama")
    model_b, _ = load_backbone("tiny-llama")
    assert tokenizer.pad_token_id is not None and model_a.config.pad_token_id == tokenizer.pad_token_id
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert a.equal(b), name


def test_chat_template_used_when_present_plain_format_otherwise():
    _, plain = load_backbone("tiny-llama")
    assert chat_formatter(plain, "plain")("Hi?", "Yes") == ("User: Hi?\nAssistant:", " Yes")
    assert chat_formatter(plain)("Hi?", "Yes") == ("<|user|>Hi?<eos><|assistant|>", "Yes<eos>")  # the authors' format
    _, chat = load_backbone("tiny-llama-chat")
    prefix, suffix = chat_formatter(chat)("Hi?", "Yes")
    assert prefix == "<|user|>\nHi?<|end|>\n<|assistant|>\n"
    assert suffix == "Yes<|end|>\n"  # all that follows the prompt in the templated conversation


def test_extra_tokens_become_single_tokens():
    model, tokenizer = load_backbone("tiny-llama", extra_tokens=["<sep>"])
    assert len(tokenizer("<sep>", add_special_tokens=False)["input_ids"]) == 1
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)


def test_unloadable_backbone_is_one_clear_line(tmp_path):
    with pytest.raises(BackboneError) as error:
        load_backbone(str(tmp_path / "no-such-model"))
    message = str(error.value)
    assert "\n" not in message and "local directory" in message


# --- the hub unreachable: offline at once instead of a minute of retries ----------------------------


@pytest.fixture
def hub_check(monkeypatch):
    """A fresh answer to hub_unreachable, no proxy, and the libraries' offline switches restored after."""
    import socket

    import huggingface_hub.constants

    from rm_lightning import hub

    for name in hub.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub.hub_unreachable.cache_clear()
    yield lambda resolves: monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [] if resolves else _no_name())
    hub.hub_unreachable.cache_clear()


def _no_name():
    import socket

    raise socket.gaierror(-2, "Name or service not known")


def test_a_hub_id_with_the_hub_unresolvable_puts_the_libraries_offline_before_loading(hub_check):
    import huggingface_hub.constants

    hub_check(False)
    with pytest.raises(BackboneError, match="Without internet"):
        load_backbone("some-org/not-in-any-cache")
    assert huggingface_hub.constants.is_offline_mode()


def test_a_backbone_that_does_not_load_names_the_option_as_the_command_line_spells_it(hub_check):
    """``model.backbone`` is no option: the CLI's and the configs' is ``model.init_args.backbone``."""
    hub_check(False)
    with pytest.raises(BackboneError, match="point `--model.init_args.backbone` at a local directory"):
        load_backbone("some-org/not-in-any-cache")


@pytest.mark.parametrize("resolves, proxy, unreachable", [(True, None, False), (False, None, True),
                                                         (False, "http://proxy:3128", False)])
def test_the_hub_is_judged_unreachable_only_when_its_name_fails_without_a_proxy(resolves, proxy, unreachable,
                                                                              hub_check, monkeypatch):
    from rm_lightning import hub

    hub_check(resolves)
    if proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy)
    assert hub.hub_unreachable() is unreachable
