"""The Kubernetes manifests (deploy/kubernetes): rendered by Kustomize, valid for a pinned Kubernetes, and wired
to what the program reads.

Rendering uses ``kubectl kustomize`` (Kustomize built into kubectl; ``kustomize build`` if that is what is on the
PATH): the real renderer, offline. Every rendered object is validated by kubernetes-validate against the
OpenAPI schemas of Kubernetes ``KUBERNETES_VERSION`` in strict mode (an unknown field is an error, as with
``kubectl apply --validate=strict``). Then the wiring: every pod's environment and settings file, assembled as
the kubelet would (ConfigMaps, Secrets with placeholder values, the downward API), load with
:func:`config.load_settings`; ports, probes, Services, upstream URLs, the advertised address, the migration
Job's command and the key-encryption key's path from Secret to the file identity reads must agree.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from config import DEFAULT_PORTS, SERVICES, load_settings
from identity.keystore import KeyEncryptionKeys
from runtime.cli import build_parser
from runtime.processes import SCALABLE

KUBERNETES_VERSION = "1.32"  # the oldest minor the manifests target (preStop sleep, matchLabelKeys)
ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = {"base": KUBE / "base", "production": KUBE / "overlays" / "production"}
DOC = ROOT / "docs" / "kubernetes.md"
DATABASE_SERVICES = ("identity", "catalog", "cart", "order")
POD_IP = "10.1.2.3"

# What the Secrets hold in production, as a value of the right shape (the repository holds no real value).
SECRET_VALUES = {
    (
        "ecom-bus",
        "connection-string",
    ): "Endpoint=sb://bus.invalid/;SharedAccessKeyName=ecom;SharedAccessKey=placeholder",
    ("ecom-admin", "password"): "placeholder password",
    ("ecom-redis", "url"): "redis://redis.invalid:6379/0",
    **{
        ("ecom-databases", name): f"mssql+aioodbc://ecom:placeholder@sql.invalid:1433/{name}"
        "?driver=ODBC+Driver+18+for+SQL+Server&Encrypt=yes"
        for name in DATABASE_SERVICES
    },
}


def _renderer() -> list[str]:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    message = "neither kubectl nor kustomize is on the PATH: the manifests cannot be rendered"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def render(overlay: Path) -> list[dict[str, Any]]:
    out = subprocess.run([*_renderer(), str(overlay)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, f"rendering {overlay} failed: {out.stderr}"
    return [obj for obj in yaml.safe_load_all(out.stdout) if obj]


@pytest.fixture(scope="module", params=list(OVERLAYS))
def rendered(request) -> list[dict[str, Any]]:
    return render(OVERLAYS[request.param])


@pytest.fixture(scope="module")
def production() -> list[dict[str, Any]]:
    return render(OVERLAYS["production"])


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def configmap(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    return one(objects, "ConfigMap", name)["data"]


def pod_templates(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job"):
            yield f"{obj['kind']} {obj['metadata']['name']}", obj["spec"]["template"]


def container_env(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom first, then env in order, ``$(VAR)``
    expanded from what is defined before it; Secrets give the placeholder values above."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmap(objects, source["configMapRef"]["name"]))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
            continue
        ref = var["valueFrom"]
        if "fieldRef" in ref:
            assert ref["fieldRef"]["fieldPath"] == "status.podIP", var
            env[var["name"]] = POD_IP
        else:
            secret = ref["secretKeyRef"]
            env[var["name"]] = SECRET_VALUES[(secret["name"], secret["key"])]
    return env


def mounted_file(objects: list[dict[str, Any]], pod: dict[str, Any], container: dict[str, Any], path: str) -> str:
    """The content of the ConfigMap file the container sees at ``path``."""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix) and "configMap" in volumes[mount["name"]]:
            return configmap(objects, volumes[mount["name"]]["configMap"]["name"])[path[len(prefix) :]]
    raise AssertionError(f"nothing is mounted at {path} in {container['name']}")


def settings_of(objects, pod, container, tmp_path: Path):
    env = container_env(objects, container)
    settings_file = tmp_path / f"{container['name']}.toml"
    settings_file.write_text(mounted_file(objects, pod, container, env["ECOM_CONFIG"]))
    return env, load_settings({**env, "ECOM_CONFIG": str(settings_file)})


# ---------------------------------------------------------------------------------------------------
# Schemas


def test_every_object_is_valid_for_the_pinned_kubernetes(rendered):
    assert rendered, "nothing rendered"
    errors: list[str] = []
    for obj in rendered:
        where = f"{obj['kind']} {obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{where}: {exc.message}")
    assert not errors, f"invalid for Kubernetes {KUBERNETES_VERSION}:\n" + "\n".join(errors)


def test_the_validation_refuses_an_unknown_field_and_a_wrong_type(production):
    """The check above can fail: strict mode refuses what `kubectl apply --validate=strict` would."""
    deployment = copy.deepcopy(one(production, "Deployment", "catalog"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/health/ready"
    with pytest.raises(kubernetes_validate.ValidationError, match="pathh"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    autoscaler = copy.deepcopy(one(production, "HorizontalPodAutoscaler", "cart"))
    autoscaler["spec"]["minReplicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError, match="not of type"):
        kubernetes_validate.validate(autoscaler, KUBERNETES_VERSION, strict=True)


# ---------------------------------------------------------------------------------------------------
# Services


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_has_a_deployment_with_probes_resources_and_a_service(production, name):
    deployment = one(production, "Deployment", name)
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [container] = pod["spec"]["containers"]
    args = build_parser().parse_args(container["args"])
    assert (args.command, args.service) == ("serve", name)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": DEFAULT_PORTS[name]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/health/live"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys(), kind
    service = one(production, "Service", name)
    assert service["spec"]["selector"].items() <= labels.items()
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(DEFAULT_PORTS[name], "http")]


@pytest.mark.parametrize("name", SCALABLE)
def test_actor_services_have_a_disruption_budget_and_an_autoscaler(production, name):
    deployment = one(production, "Deployment", name)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    budget = one(production, "PodDisruptionBudget", name)
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1
    autoscaler = one(production, "HorizontalPodAutoscaler", name)
    assert autoscaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert 2 <= autoscaler["spec"]["minReplicas"] < autoscaler["spec"]["maxReplicas"]
    # The autoscaler owns the replica count: an apply must not reset it.
    assert "replicas" not in deployment["spec"]


def test_every_pod_runs_unprivileged_on_a_read_only_root(production):
    templates = list(pod_templates(production))
    assert len(templates) == len(SERVICES) + 1  # a Deployment each, and the migration Job
    for where, pod in templates:
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, (where, container["name"])
            assert context["allowPrivilegeEscalation"] is False, (where, container["name"])
            assert context["capabilities"] == {"drop": ["ALL"]}, (where, container["name"])


def test_images_are_pinned(production):
    for where, pod in pod_templates(production):
        for container in [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]:
            image = container["image"]
            assert re.search(r"(:[\w.-]+|@sha256:[0-9a-f]{64})$", image), (where, image)
            assert not image.endswith(":latest"), (where, image)


# ---------------------------------------------------------------------------------------------------
# Wiring: what the program reads


@pytest.mark.parametrize("name", SERVICES)
def test_each_pod_loads_production_settings(production, name, tmp_path):
    """Every ECOM_* variable is one the program knows and every value is valid: the bus is Azure Service Bus,
    the database is the service's own from its Secret, the advertised address is the pod's."""
    pod = one(production, "Deployment", name)["spec"]["template"]
    [container] = pod["spec"]["containers"]
    _, settings = settings_of(production, pod, container, tmp_path)
    assert settings.bus.backend == "azure"
    assert settings.bus.url == SECRET_VALUES[("ecom-bus", "connection-string")]
    assert settings.general.host == "0.0.0.0"
    assert settings.services[name].port == DEFAULT_PORTS[name]
    secrets = {
        var["name"]: (var["valueFrom"]["secretKeyRef"]["name"], var["valueFrom"]["secretKeyRef"]["key"])
        for var in container["env"]
        if "secretKeyRef" in var.get("valueFrom", {})
    }
    databases = {var: ref for var, ref in secrets.items() if var.endswith("_DATABASE_URL")}
    if name in DATABASE_SERVICES:
        # Only its own database: a service never holds another's credentials.
        assert databases == {f"ECOM_{name.upper()}_DATABASE_URL": ("ecom-databases", name)}
        assert settings.database_url(name).startswith("mssql+aioodbc://")
        # Its instances form a cluster through its database and reach each other at the pod's address.
        assert settings.cluster.active(settings.bus.backend)
        assert settings.cluster.advertise_url == f"http://{POD_IP}:{DEFAULT_PORTS[name]}"
    else:
        assert databases == {}
    # Upstream URLs name the Services of the other services, on their ports.
    for upstream in DATABASE_SERVICES:
        [url] = settings.services[upstream].upstreams.split(",")
        service = one(production, "Service", upstream)
        assert url == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


def test_the_migration_job_upgrades_every_database(production, tmp_path):
    job = one(production, "Job", "ecom-db-upgrade")
    pod = job["spec"]["template"]
    assert pod["spec"]["restartPolicy"] == "Never"
    [container] = pod["spec"]["containers"]
    args = build_parser().parse_args(container["args"])
    assert (args.command, args.db_command, args.services) == ("db", "upgrade", [])
    _, settings = settings_of(production, pod, container, tmp_path)
    for name in DATABASE_SERVICES:
        assert settings.database_url(name) == SECRET_VALUES[("ecom-databases", name)]


def test_identity_reads_its_key_encryption_key_from_the_secret(production, tmp_path):
    """Secret -> read-only volume -> init container copy (0600, in memory) -> ECOM_IDENTITY_KEK_FILE. The init
    container's command runs here on a key file made as docs/kubernetes.md says, left group-readable as the
    kubelet leaves a Secret file under fsGroup; identity then opens the copy."""
    pod = one(production, "Deployment", "identity")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    [init] = pod["initContainers"]
    [container] = pod["containers"]
    kek_file = container_env(production, container)["ECOM_IDENTITY_KEK_FILE"]

    def volume_at(c: dict[str, Any], path: str) -> tuple[str, str]:
        for mount in c["volumeMounts"]:
            if path.startswith(mount["mountPath"].rstrip("/") + "/"):
                return mount["name"], mount["mountPath"]
        raise AssertionError(f"nothing mounted at {path} in {c['name']}")

    kek_volume, kek_dir = volume_at(container, kek_file)
    assert volumes[kek_volume]["emptyDir"]["medium"] == "Memory"
    command = init["command"]
    assert command[:3] == ["install", "-m", "0600"]
    source, target = command[3:]
    assert target == kek_file and volume_at(init, target)[0] == kek_volume
    secret_volume, secret_dir = volume_at(init, source)
    assert volumes[secret_volume]["secret"]["secretName"] == "ecom-identity-kek"
    assert source == f"{secret_dir}/identity.kek"

    # The same command, with the two mount points mapped into tmp_path.
    (tmp_path / "secret").mkdir()
    (tmp_path / "kek").mkdir(mode=0o700)
    made = tmp_path / "secret" / "identity.kek"
    kek_id = KeyEncryptionKeys(made).current()[0]
    made.chmod(0o440)
    local = {secret_dir: str(tmp_path / "secret"), kek_dir: str(tmp_path / "kek")}

    def mapped(path: str) -> str:
        for mount, here in local.items():
            if path.startswith(mount + "/"):
                return here + path[len(mount) :]
        return path

    subprocess.run([mapped(arg) for arg in command], check=True, timeout=30)
    copied = Path(mapped(kek_file))
    assert copied.stat().st_mode & 0o777 == 0o600
    assert KeyEncryptionKeys(copied).ids() == [kek_id]


def test_secrets_are_created_out_of_band_as_the_guide_says(production):
    """No Secret is rendered (no value lives in the repository); every one the pods use is created by a command
    in docs/kubernetes.md with the keys they read."""
    assert not [o for o in production if o["kind"] == "Secret"]
    used: dict[str, set[str]] = {}
    for _, pod in pod_templates(production):
        for volume in pod["spec"].get("volumes", []):
            if "secret" in volume:
                items = volume["secret"].get("items")
                keys = {i["key"] for i in items} if items else {"identity.kek"}
                used.setdefault(volume["secret"]["secretName"], set()).update(keys)
        for container in [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]:
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    used.setdefault(ref["name"], set()).add(ref["key"])
    assert set(used) == {name for name, _ in SECRET_VALUES} | {"ecom-identity-kek"}
    commands = _create_secret_commands(DOC.read_text())
    for name, keys in used.items():
        assert name in commands, f"docs/kubernetes.md does not say how to create the Secret {name}"
        for key in keys:
            assert re.search(rf"--from-(literal|file)={re.escape(key)}\b", commands[name]), (name, key)


def _create_secret_commands(doc: str) -> Mapping[str, str]:
    """``kubectl ... create secret generic NAME ...`` commands of the guide (with continuation lines), by NAME."""
    commands: dict[str, str] = {}
    lines = iter(doc.splitlines())
    for line in lines:
        found = re.search(r"create secret generic ([\w-]+)", line)
        if not found:
            continue
        text = line
        while text.rstrip().endswith("\\"):
            text += "\n" + next(lines)
        commands[found.group(1)] = text
    return commands


def test_the_ingress_host_is_the_token_issuer(production, tmp_path):
    ingress = one(production, "Ingress", "ecom")
    [rule] = ingress["spec"]["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "gateway", "port": {"name": "http"}}
    pod = one(production, "Deployment", "gateway")["spec"]["template"]
    _, settings = settings_of(production, pod, pod["spec"]["containers"][0], tmp_path)
    assert settings.issuer == f"https://{rule['host']}"
    assert rule["host"] in ingress["spec"]["tls"][0]["hosts"]
