"""Pure parts of the Ray glue: the runtime_env field, error classes, labels, options."""

from __future__ import annotations

import pytest

from modelcast.errors import ArtifactNotFound, BadRequest, InvalidReference, PullFailed, RemoteError, Unauthorized, \
    Unreachable
from serve_glue.launcher import plan
from serve_glue.deploy import summary
from serve_glue.placement import artifact_label, modelcast_options, node_labels, unmet_requirement
from serve_glue.spec import activation_env, is_permanent, label_safe, parse_env

D = "sha256:" + "ab" * 32


def test_parse_env_names_uris_and_variables():
    spec = parse_env({"artifacts": {"MODEL": "resnet:v3", "TOKENIZER": f"tok@{D}"}, "runtime": "ort:1.31"})
    assert spec.uris == ["modelcast://resnet:v3", f"modelcast://tok@{D}", "modelcast-runtime://ort:1.31"]
    model = spec.artifact_for("modelcast://resnet:v3")
    assert (model.path_var, model.digest_var, model.holder) == ("MODELCAST_MODEL_PATH", "MODELCAST_MODEL_DIGEST",
                                                                 "ray-env:resnet:v3")


@pytest.mark.parametrize("field, needle", [
    ("resnet:v3", "must be a dict"),
    ({"artifacts": {"model": "resnet:v3"}}, "upper case"),
    ({"artifacts": {"RUNTIME": "resnet:v3"}}, "RUNTIME"),
    ({"artifacts": {"MODEL": "Bad Name"}}, "invalid"),
    ({"artifacts": {}}, "names no artifact"),
    ({"artifacts": {"MODEL": "m:v1"}, "extra": 1}, "unknown keys"),
])
def test_parse_env_rejects_with_a_message(field, needle):
    with pytest.raises(ValueError, match=needle):
        parse_env(field)


def test_permanent_and_transient_failures():
    assert is_permanent(ArtifactNotFound("x")) and is_permanent(Unauthorized("x"))
    assert is_permanent(InvalidReference("x")) and is_permanent(BadRequest("x"))
    assert is_permanent(RemoteError("quota", "quota_exceeded", 500))
    assert not is_permanent(Unreachable("daemon down")) and not is_permanent(PullFailed("download failed"))
    assert not is_permanent(RemoteError("boom", "error", 502))


def test_activation_env_prepends_path_lists():
    env = activation_env({"PYTHONPATH": "/l/site", "LD_LIBRARY_PATH": "/l/lib", "ORT_VARIANT": "cpu"},
                         {"PYTHONPATH": "/user"})
    assert env == {"PYTHONPATH": "/l/site:/user", "LD_LIBRARY_PATH": "/l/lib:${LD_LIBRARY_PATH}", "ORT_VARIANT": "cpu"}


def test_labels_follow_kubernetes_syntax():
    rules = pytest.importorskip("ray._private.label_utils")  # the rules Ray applies
    validate_label_key, validate_label_value = rules.validate_label_key, rules.validate_label_value

    for ref in ("resnet:v3", "org/team/model-x:2024.06.01", f"m@{D}", "a" * 200 + ":v1"):
        key = artifact_label(ref)
        assert validate_label_key(key) is None, key
    for k, v in node_labels("cuda12", "rack-a/1", ["resnet:v3"]).items():
        assert validate_label_key(k) is None
        validate_label_value(v)
    assert label_safe("x" * 200 + ":v1") != label_safe("x" * 200 + ":v2")


def test_options_prefer_accelerator_zone_and_holders_and_require_only_when_asked():
    opts = modelcast_options({"MODEL": "resnet:v3"}, runtime="ort:1.31", accelerator="cuda12", zone="rack-a",
                             num_gpus=1, runtime_env={"env_vars": {"A": "1"}})
    assert opts["runtime_env"] == {"env_vars": {"A": "1"},
                                   "modelcast": {"artifacts": {"MODEL": "resnet:v3"}, "runtime": "ort:1.31"}}
    acc, zone, has = {"modelcast.io/accelerator": "cuda12"}, {"modelcast.io/zone": "rack-a"}, \
        {artifact_label("resnet:v3"): "1"}
    assert opts["label_selector"] == {**acc, **zone, **has}
    # Relaxed one preference at a time; the last fallback admits any node.
    assert opts["fallback_strategy"] == [{"label_selector": {**acc, **zone}}, {"label_selector": acc},
                                         {"label_selector": {}}]
    assert opts["num_gpus"] == 1
    required = modelcast_options({"MODEL": "resnet:v3"}, accelerator="cuda12", zone="rack-a",
                                 require_accelerator=True)
    assert required["fallback_strategy"][-1] == {"label_selector": acc}
    assert modelcast_options({"MODEL": "resnet:v3"}, accelerator="cuda12", zone="rack-a", hard=True) == \
        {"runtime_env": {"modelcast": {"artifacts": {"MODEL": "resnet:v3"}}}, "label_selector": {**acc, **zone, **has}}
    mine = modelcast_options({"MODEL": "resnet:v3"}, accelerator="cpu", label_selector={"team": "a"})
    assert mine["fallback_strategy"][-1] == {"label_selector": {"team": "a"}}  # a given selector is required
    plain = modelcast_options({"MODEL": "resnet:v3"}, prefer_holders=False)
    assert "label_selector" not in plain and "fallback_strategy" not in plain
    with pytest.raises(ValueError):
        modelcast_options({"MODEL": "NOT a ref"})
    with pytest.raises(ValueError, match="needs accelerator"):
        modelcast_options({"MODEL": "resnet:v3"}, require_accelerator=True)


def _equal_match(labels: dict, selector: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_unmet_requirement_names_the_label_and_the_command_that_sets_it():
    soft = modelcast_options({"MODEL": "resnet:v3"}, accelerator="cuda12")
    hard = modelcast_options({"MODEL": "resnet:v3"}, accelerator="cuda12", require_accelerator=True)
    plain_nodes = [{"ray.io/node-id": "a"}, {"ray.io/node-id": "b"}]
    assert unmet_requirement("M", soft, plain_nodes, _equal_match) is None
    why = unmet_requirement("M", hard, plain_nodes, _equal_match)
    assert "'M' requires node label modelcast.io/accelerator=cuda12" in why
    assert "none of the 2 node(s)" in why and "modelcast ray start --accelerator cuda12" in why
    cpu_nodes = [node_labels("cpu", "rack-a")]
    why = unmet_requirement("M", hard, cpu_nodes, _equal_match)
    assert "modelcast.io/accelerator=cpu" in why  # what the nodes do have
    assert unmet_requirement("M", hard, cpu_nodes + [node_labels("cuda12")], _equal_match) is None


def test_deploy_failure_summary_keeps_the_plugins_exception():
    message = ("DEPLOY_FAILED: The deployment failed to start 3 times in a row. See controller logs for details. "
               "Error:\nCould not create the actor because its associated runtime env failed to be created.\n"
               "[Node 10.0.0.1] Traceback (most recent call last):\n  File \"x.py\", line 1, in create\n"
               "    raise X\nmodelcast.errors.ArtifactNotFound: pull a/b:v1: artifact a/b:v1 not found in registry\n")
    assert summary(message) == ("DEPLOY_FAILED: The deployment failed to start 3 times in a row. See controller "
                                "logs for details. modelcast.errors.ArtifactNotFound: pull a/b:v1: artifact a/b:v1 "
                                "not found in registry")
    assert summary("UPDATING") == "UPDATING"


def test_ray_start_plan_sets_plugin_node_and_labels():
    p = plan("http://127.0.0.1:7071", ["--address", "head:6379"], accelerator="cpu", zone="rack-a",
             preloaded=["resnet:v3"])
    assert p.env["MODELCAST_NODE"] == "http://127.0.0.1:7071"
    assert "serve_glue.plugin.ModelcastPlugin" in p.env["RAY_RUNTIME_ENV_PLUGINS"]
    assert p.argv[-2:] == ["--labels", f"modelcast.io/accelerator=cpu,modelcast.io/zone=rack-a,"
                                        f"{artifact_label('resnet:v3')}=1"]
