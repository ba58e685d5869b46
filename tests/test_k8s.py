"""deploy/k8s: the Kubernetes manifests, rendered and checked offline (no cluster, no network).

`kubectl kustomize deploy` renders them (kubectl's own kustomize needs no cluster; the
kustomization sits in deploy/ so that it can read deploy/haproxy/haproxy.cfg for the API pods'
edge).
kubernetes-validate checks every core object in strict mode, where an unknown field is an
error, against the schemas of KUBERNETES_VERSION. It has no schema for CloudNativePG's Cluster,
so that one is checked against the fields that CloudNativePG's API reference lists (CNPG_CLUSTER).
The other tests check what docs/deploy.md promises: replicas and autoscaling, probes,
resources, the image's user, disruption budgets, spreading, shutdown timings, where the
services' database URLs point and that no secret value is written into a manifest.

Without kubectl these tests are skipped, unless REQUIRE_KUBECTL=1, where they fail.
"""

from __future__ import annotations

import copy
import datetime as dt
import inspect
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate
import psycopg_pool
import pytest
import waitress.task
import yaml
from kubernetes_validate import utils as kv_utils

import billing_worker
import db

from support import unavailable

ROOT = Path(__file__).resolve().parent.parent
KUSTOMIZATION_DIR = ROOT / "deploy"
EDGE_CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
DEPLOY_GUIDE = ROOT / "docs" / "deploy.md"

# The newest Kubernetes that the pinned kubernetes-validate has schemas for (1.37.0 ships 1.37).
KUBERNETES_VERSION = "1.37.0"
NAMESPACE = "clinic-billing"
CNPG_API = "postgresql.cnpg.io/v1"

API, WORKER, MIGRATE, CLUSTER = "clinic-api", "clinic-billing-worker", "clinic-billing-migrate", "clinic-db"
# Each Deployment: its Service, its process's port and that port's name (config.py's variable for
# it), its database role. The API's Service goes to the edge in front of it, whose port is `http`.
SERVICES = {
    API: {"service": "clinic-api", "port": 8080, "port_name": "api", "port_variable": "APPOINTMENTS_PORT", "role": "clinic_api"},
    WORKER: {"service": "clinic-billing", "port": 8081, "port_name": "http", "port_variable": "BILLING_PORT", "role": "clinic_worker"},
}

# How long each service may take from SIGTERM to exit, from the code that decides it.
# The API: waitress waits this long for the requests in flight, then the pool closes.
WAITRESS_DRAIN = inspect.signature(waitress.task.ThreadedTaskDispatcher.shutdown).parameters["timeout"].default
POOL_CLOSE = int(inspect.signature(psycopg_pool.ConnectionPool.close).parameters["timeout"].default)
# The worker: the batch in progress (at most its statement_timeout), the HTTP server, the pool.
BATCH_LIMIT = int(billing_worker.WORKER_SESSION["statement_timeout"].removesuffix("s"))
WORKER_HTTP_STOP = int(re.search(r"task_dispatcher\.shutdown\(timeout=(\d+)\)", inspect.getsource(billing_worker.main))[1])
SHUTDOWN_SECONDS = {API: WAITRESS_DRAIN + POOL_CLOSE, WORKER: BATCH_LIMIT + WORKER_HTTP_STOP + POOL_CLOSE}


# ---------------------------------------------------------------------------------------------
# The CloudNativePG Cluster's fields, from the CloudNativePG 1.30 API reference:
#   https://cloudnative-pg.io/docs/1.30/cloudnative-pg.v1
#   (source: github.com/cloudnative-pg/cloudnative-pg, docs/src/cloudnative-pg.v1.md at v1.30.0)
# Each object type lists every field the reference gives it; the types this Cluster uses are
# spelled out (ClusterSpec, PostgresConfiguration, SynchronousReplicaConfiguration,
# BootstrapConfiguration, BootstrapInitDB, AffinityConfiguration, StorageConfiguration), the rest
# are ANY. A set is the field's enum; a Python type, its JSON type.


class Obj:
    """An object type of the API reference: its fields and the ones it requires."""

    def __init__(self, fields: dict, required: tuple[str, ...] = ()):
        self.fields, self.required = fields, required


ANY = object()

SYNCHRONOUS_REPLICA_CONFIGURATION = Obj(
    {
        "method": {"any", "first"},
        "number": int,
        "maxStandbyNamesFromCluster": int,
        "standbyNamesPre": list,
        "standbyNamesPost": list,
        "dataDurability": {"required", "preferred"},
        "failoverQuorum": bool,
    },
    required=("method", "number"),
)
POSTGRES_CONFIGURATION = Obj(
    {
        "parameters": dict,
        "synchronous": SYNCHRONOUS_REPLICA_CONFIGURATION,
        "pg_hba": list,
        "pg_ident": list,
        "syncReplicaElectionConstraint": ANY,
        "shared_preload_libraries": list,
        "ldap": ANY,
        "promotionTimeout": int,
        "enableAlterSystem": bool,
        "extensions": list,
    }
)
BOOTSTRAP_INITDB = Obj(
    {
        name: ANY
        for name in (
            "options dataChecksums encoding localeCollate localeCType locale localeProvider icuLocale icuRules "
            "builtinLocale walSegmentSize postInitSQL postInitApplicationSQL postInitTemplateSQL import "
            "postInitApplicationSQLRefs postInitTemplateSQLRefs postInitSQLRefs secret"
        ).split()
    }
    | {"database": str, "owner": str}
)

class ListOf:
    """A list whose items are all of one type."""

    def __init__(self, item):
        self.item = item


# Backups: BackupConfiguration, and Barman Cloud's BarmanObjectStoreConfiguration with what it
# holds (github.com/cloudnative-pg/barman-cloud, pkg/api/config.go, which the reference links).
SECRET_KEY_SELECTOR = Obj({"name": str, "key": str}, required=("name", "key"))
S3_CREDENTIALS = Obj(
    {"accessKeyId": SECRET_KEY_SELECTOR, "secretAccessKey": SECRET_KEY_SELECTOR, "region": SECRET_KEY_SELECTOR,
     "sessionToken": SECRET_KEY_SELECTOR, "inheritFromIAMRole": bool}
)
WAL_BACKUP_CONFIGURATION = Obj(
    {"compression": {"bzip2", "gzip", "lz4", "snappy", "xz", "zstd"}, "encryption": {"AES256", "aws:kms"}, "maxParallel": int,
     "archiveAdditionalCommandArgs": list, "restoreAdditionalCommandArgs": list}
)
DATA_BACKUP_CONFIGURATION = Obj(
    {"compression": {"bzip2", "gzip", "lz4", "snappy"}, "encryption": {"AES256", "aws:kms"}, "jobs": int,
     "immediateCheckpoint": bool, "additionalCommandArgs": list, "restoreAdditionalCommandArgs": list}
)
BARMAN_OBJECT_STORE = Obj(
    {"s3Credentials": S3_CREDENTIALS, "azureCredentials": ANY, "googleCredentials": ANY, "endpointURL": str, "endpointCA": ANY,
     "destinationPath": str, "serverName": str, "wal": WAL_BACKUP_CONFIGURATION, "data": DATA_BACKUP_CONFIGURATION,
     "tags": dict, "historyTags": dict},
    required=("destinationPath",),
)
BACKUP_CONFIGURATION = Obj(
    {"volumeSnapshot": ANY, "barmanObjectStore": BARMAN_OBJECT_STORE, "retentionPolicy": str, "target": {"primary", "prefer-standby"}}
)
RECOVERY_TARGET = Obj(
    {"backupID": str, "targetTLI": str, "targetXID": str, "targetName": str, "targetLSN": str, "targetTime": str,
     "targetImmediate": bool, "exclusive": bool}
)
BOOTSTRAP_RECOVERY = Obj(
    {"backup": ANY, "source": str, "volumeSnapshots": ANY, "recoveryTarget": RECOVERY_TARGET, "database": str, "owner": str, "secret": ANY}
)
EXTERNAL_CLUSTER = Obj(
    {"name": str, "connectionParameters": dict, "sslCert": ANY, "sslKey": ANY, "sslRootCert": ANY, "password": ANY,
     "barmanObjectStore": BARMAN_OBJECT_STORE, "plugin": ANY},
    required=("name",),
)
BOOTSTRAP_CONFIGURATION = Obj({"initdb": BOOTSTRAP_INITDB, "recovery": BOOTSTRAP_RECOVERY, "pg_basebackup": ANY})
AFFINITY_CONFIGURATION = Obj(
    {
        "enablePodAntiAffinity": bool,
        "topologyKey": str,
        "nodeSelector": dict,
        "nodeAffinity": ANY,
        "tolerations": list,
        "podAntiAffinityType": {"preferred", "required"},
        "additionalPodAntiAffinity": ANY,
        "additionalPodAffinity": ANY,
    }
)
STORAGE_CONFIGURATION = Obj({"storageClass": str, "size": str, "resizeInUseVolumes": bool, "pvcTemplate": ANY})
RESOURCE_REQUIREMENTS = Obj({"limits": dict, "requests": dict, "claims": list})  # Kubernetes' own type
CLUSTER_SPEC = Obj(
    {name: ANY for name in (
        "inheritedMetadata imageCatalogRef imagePullPolicy schedulerName postgresUID postgresGID podSelectorRefs "
        "replicationSlots replica superuserSecret certificates imagePullSecrets serviceAccountTemplate "
        "serviceAccountName walStorage ephemeralVolumeSource startDelay stopDelay smartShutdownTimeout "
        "switchoverDelay failoverDelay livenessProbeTimeout topologySpreadConstraints ephemeralVolumesSizeLimit "
        "priorityClassName nodeMaintenanceWindow monitoring logLevel "
        "projectedVolumeTemplate env envFrom managed seccompProfile podSecurityContext securityContext "
        "tablespaces enablePDB plugins probes primaryLease minSyncReplicas maxSyncReplicas"
    ).split()}
    | {
        "description": str,
        "imageName": str,
        "instances": int,
        "postgresql": POSTGRES_CONFIGURATION,
        "bootstrap": BOOTSTRAP_CONFIGURATION,
        "enableSuperuserAccess": bool,
        "storage": STORAGE_CONFIGURATION,
        "affinity": AFFINITY_CONFIGURATION,
        "resources": RESOURCE_REQUIREMENTS,
        "primaryUpdateStrategy": {"unsupervised", "supervised"},
        "primaryUpdateMethod": {"switchover", "restart"},
        "backup": BACKUP_CONFIGURATION,
        "externalClusters": ListOf(EXTERNAL_CLUSTER),
    },
    required=("instances",),
)
CNPG_CLUSTER = Obj(
    {"apiVersion": {CNPG_API}, "kind": {"Cluster"}, "metadata": dict, "spec": CLUSTER_SPEC, "status": ANY},
    required=("apiVersion", "kind", "metadata", "spec"),
)
SCHEDULED_BACKUP_SPEC = Obj(
    {"suspend": bool, "immediate": bool, "schedule": str, "cluster": Obj({"name": str}, required=("name",)),
     "backupOwnerReference": {"none", "self", "cluster"}, "target": {"primary", "prefer-standby"},
     "method": {"barmanObjectStore", "volumeSnapshot", "plugin"}, "pluginConfiguration": ANY, "online": bool, "onlineConfiguration": ANY},
    required=("schedule", "cluster"),
)
CNPG_SCHEDULED_BACKUP = Obj(
    {"apiVersion": {CNPG_API}, "kind": {"ScheduledBackup"}, "metadata": dict, "spec": SCHEDULED_BACKUP_SPEC, "status": ANY},
    required=("apiVersion", "kind", "metadata", "spec"),
)


def cnpg_errors(value, kind, path: str = "") -> list[str]:
    """Where ``value`` strays from ``kind`` (an Obj, an enum set, a JSON type or ANY)."""
    if kind is ANY:
        return []
    if isinstance(kind, ListOf):
        if not isinstance(value, list):
            return [f"{path}: {value!r} is not a list"]
        return [error for i, item in enumerate(value) for error in cnpg_errors(item, kind.item, f"{path}[{i}]")]
    if isinstance(kind, set):
        return [] if value in kind else [f"{path}: {value!r} is not one of {sorted(kind)}"]
    if isinstance(kind, type):
        wrong = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        return [f"{path}: {value!r} is not a {kind.__name__}"] if wrong else []
    if not isinstance(value, dict):
        return [f"{path}: {value!r} is not an object"]
    errors = [f"{path}.{name}: required" for name in kind.required if name not in value]
    for name, item in value.items():
        if name not in kind.fields:
            errors.append(f"{path}.{name}: not a field of this type in the CloudNativePG API reference")
        else:
            errors += cnpg_errors(item, kind.fields[name], f"{path}.{name}")
    return errors


# ---------------------------------------------------------------------------------------------
# The rendered manifests.


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        unavailable("kubectl is not on the PATH (it renders deploy with its built-in kustomize)", "REQUIRE_KUBECTL")
    cmd = [kubectl, "kustomize", str(KUSTOMIZATION_DIR)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"`{' '.join(cmd)}` exited {proc.returncode}\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def find(objects: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered"
    return matches[0]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def pod_labels(obj: dict) -> dict:
    return obj["spec"]["template"]["metadata"]["labels"]


def workloads(objects: list[dict]) -> list[dict]:
    """Everything that runs a pod: both Deployments and the migration Job."""
    return [o for o in objects if o["kind"] in ("Deployment", "Job")]


def container(obj: dict) -> dict:
    (only,) = pod_spec(obj)["containers"]
    return only


def env(obj: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container(obj).get("env", [])}


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def mebibytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()
    return int(number) * (1024 if unit == "Gi" else 1)


def dockerfile_user() -> tuple[int, int]:
    match = re.search(r"(?m)^USER\s+(\d+):(\d+)\s*$", (ROOT / "Dockerfile").read_text())
    assert match, "the Dockerfile has no numeric USER uid:gid"
    return int(match[1]), int(match[2])


# ---------------------------------------------------------------------------------------------
# Rendering and schema validation.


def test_kustomize_renders_every_object_into_the_namespace_and_no_secret(rendered):
    """kubectl kustomize renders the Deployments, Services, HPA, PDBs, Job, config and Cluster."""
    def name(obj: dict) -> str:  # a generated ConfigMap's name ends in a hash of its contents
        return re.sub(r"-[a-z0-9]{10}$", "-<hash>", obj["metadata"]["name"]) if obj["kind"] == "ConfigMap" else obj["metadata"]["name"]

    names = {(o["kind"], name(o)) for o in rendered}
    assert names == {
        ("Deployment", API),
        ("Deployment", WORKER),
        ("Service", "clinic-api"),
        ("Service", "clinic-billing"),
        ("HorizontalPodAutoscaler", API),
        ("PodDisruptionBudget", API),
        ("PodDisruptionBudget", WORKER),
        ("Job", MIGRATE),
        ("ConfigMap", "clinic-billing-config-<hash>"),
        ("ConfigMap", "clinic-edge-config-<hash>"),
        ("Cluster", CLUSTER),
        ("ScheduledBackup", "clinic-db-daily"),
    }
    assert {o["metadata"].get("namespace") for o in rendered} == {NAMESPACE}
    assert not [o for o in rendered if o["kind"] == "Secret"], "Secrets are made by hand or by CloudNativePG, never shipped"


def test_kubernetes_version_is_the_newest_that_kubernetes_validate_knows():
    """KUBERNETES_VERSION is the newest the installed kubernetes-validate has schemas for."""
    newest = kv_utils.major_minor(kv_utils.latest_version())
    assert kv_utils.major_minor(KUBERNETES_VERSION) == newest, f"kubernetes-validate knows {newest}: validate against it"


def test_every_core_object_is_valid_in_strict_mode(rendered):
    """Every object but the CloudNativePG Cluster passes kubernetes-validate --strict at KUBERNETES_VERSION."""
    failures = []
    for obj in rendered:
        if obj["apiVersion"] == CNPG_API:
            continue
        try:
            validated = kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc}")
        else:
            assert validated == kv_utils.major_minor(KUBERNETES_VERSION)
    assert not failures, "\n\n".join(failures)
    assert {o["kind"] for o in rendered if o["apiVersion"] == CNPG_API} == {"Cluster", "ScheduledBackup"}


def test_strict_validation_refuses_an_unknown_field(rendered):
    """The negative control: a misspelt field in a Deployment is an error, not ignored."""
    broken = copy.deepcopy(find(rendered, "Deployment", API))
    container(broken)["readinesProbe"] = container(broken).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# ---------------------------------------------------------------------------------------------
# The CloudNativePG Cluster.


def test_cnpg_cluster_uses_only_fields_of_its_api_reference(rendered):
    """Every field of the Cluster is one CloudNativePG 1.30's API reference names, of its type."""
    cluster = find(rendered, "Cluster", CLUSTER)
    assert cnpg_errors(cluster, CNPG_CLUSTER, "Cluster") == []


def test_the_cnpg_field_check_catches_a_misspelt_field(rendered):
    """The negative control: a misspelt or mistyped field of the Cluster is reported."""
    cluster = copy.deepcopy(find(rendered, "Cluster", CLUSTER))
    synchronous = cluster["spec"]["postgresql"]["synchronous"]
    synchronous["dataDurabilty"] = synchronous.pop("dataDurability")
    synchronous["number"] = "1"
    assert cnpg_errors(cluster, CNPG_CLUSTER, "Cluster") == [
        "Cluster.spec.postgresql.synchronous.number: '1' is not a int",
        "Cluster.spec.postgresql.synchronous.dataDurabilty: not a field of this type in the CloudNativePG API reference",
    ]


def test_the_cluster_archives_compressed_wal_to_an_object_store_with_a_retention_policy(rendered):
    """spec.backup: an object store, WAL and data compressed, a retention policy, credentials
    only referenced (a Secret's name and key, never a value); archive_timeout bounds the RPO."""
    spec = find(rendered, "Cluster", CLUSTER)["spec"]
    backup = spec["backup"]
    store = backup["barmanObjectStore"]
    assert re.fullmatch(r"s3://[a-z0-9.-]+/", store["destinationPath"])
    assert store["wal"]["compression"] and store["data"]["compression"]
    assert re.fullmatch(r"[1-9][0-9]*[dwm]", backup["retentionPolicy"])
    credentials = store["s3Credentials"]
    assert set(credentials) == {"accessKeyId", "secretAccessKey"}
    assert all(set(ref) == {"name", "key"} and ref["name"] == "clinic-backup-s3" for ref in credentials.values())
    timeout = spec["postgresql"]["parameters"]["archive_timeout"]
    assert re.fullmatch(r"[1-4]s", timeout), "an RPO under 5 s needs segments closed within a few seconds"


def test_a_scheduled_backup_backs_the_cluster_up_daily_into_its_store(rendered):
    scheduled = find(rendered, "ScheduledBackup", "clinic-db-daily")
    assert cnpg_errors(scheduled, CNPG_SCHEDULED_BACKUP, "ScheduledBackup") == []
    spec = scheduled["spec"]
    assert spec["cluster"]["name"] == CLUSTER and spec["method"] == "barmanObjectStore" and spec["immediate"] is True
    seconds, minutes, hours, *every = spec["schedule"].split()
    assert every == ["*", "*", "*"] and seconds.isdigit() and minutes.isdigit() and hours.isdigit(), "six fields, once a day"


def recovery_manifest() -> dict:
    """The point-in-time recovery Cluster that docs/deploy.md shows."""
    blocks = re.findall(r"```yaml\n(.*?)```", DEPLOY_GUIDE.read_text(), re.S)
    found = [doc for block in blocks for doc in yaml.safe_load_all(block) if doc and doc.get("kind") == "Cluster"]
    assert len(found) == 1, "one Cluster manifest in docs/deploy.md"
    return found[0]


def test_the_recovery_manifest_in_the_deploy_guide_restores_the_clusters_own_store_to_a_time(rendered):
    """Valid against the API reference; it reads the store and server the Cluster archives to,
    with the same referenced credentials, and stops at a time."""
    restored = recovery_manifest()
    assert cnpg_errors(restored, CNPG_CLUSTER, "Cluster") == []
    cluster = find(rendered, "Cluster", CLUSTER)["spec"]
    spec = restored["spec"]
    recovery = spec["bootstrap"]["recovery"]
    (source,) = [c for c in spec["externalClusters"] if c["name"] == recovery["source"]]
    store, archived_to = source["barmanObjectStore"], cluster["backup"]["barmanObjectStore"]
    assert store["destinationPath"] == archived_to["destinationPath"] and store["serverName"] == CLUSTER
    assert store["s3Credentials"] == archived_to["s3Credentials"]
    assert restored["metadata"]["name"] != CLUSTER and "backup" not in spec, "never archives into the store it restores from"
    assert spec["imageName"] == cluster["imageName"] and spec["postgresql"]["synchronous"] == {
        k: v for k, v in cluster["postgresql"]["synchronous"].items() if k != "failoverQuorum"
    }
    target = recovery["recoveryTarget"]["targetTime"]
    assert dt.datetime.fromisoformat(target.replace(" ", "T")).tzinfo is not None, "a time with its zone"


def test_the_cnpg_field_check_catches_a_misspelt_recovery_field():
    restored = copy.deepcopy(recovery_manifest())
    target = restored["spec"]["bootstrap"]["recovery"]["recoveryTarget"]
    target["targetTme"] = target.pop("targetTime")
    restored["spec"]["externalClusters"][0]["barmanObjectStore"]["wal"]["compression"] = "zip"
    assert cnpg_errors(restored, CNPG_CLUSTER, "Cluster") == [
        "Cluster.spec.bootstrap.recovery.recoveryTarget.targetTme: not a field of this type in the CloudNativePG API reference",
        "Cluster.spec.externalClusters[0].barmanObjectStore.wal.compression: 'zip' is not one of "
        "['bzip2', 'gzip', 'lz4', 'snappy', 'xz', 'zstd']",
    ]


def test_cnpg_cluster_has_three_instances_and_a_synchronous_replica_it_never_drops(rendered):
    """3 instances; commits wait for 1+ synchronous standby, with dataDurability required."""
    spec = find(rendered, "Cluster", CLUSTER)["spec"]
    assert spec["instances"] == 3
    synchronous = spec["postgresql"]["synchronous"]
    assert 1 <= synchronous["number"] < spec["instances"]
    # required: writes wait rather than continue without a synchronous standby ("preferred"
    # would drop to fewer); the deprecated minSyncReplicas/maxSyncReplicas are not mixed in.
    assert synchronous["dataDurability"] == "required"
    assert "minSyncReplicas" not in spec and "maxSyncReplicas" not in spec
    assert spec["affinity"]["podAntiAffinityType"] == "required"


# ---------------------------------------------------------------------------------------------
# The Deployments.


def test_the_api_runs_two_or_more_replicas_scaled_on_cpu(rendered):
    """The API's HPA scales its Deployment on CPU from 2 up; the Deployment leaves the count to it."""
    hpa = find(rendered, "HorizontalPodAutoscaler", API)["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": API}
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    assert [m["resource"]["name"] for m in hpa["metrics"] if m["type"] == "Resource"] == ["cpu"]
    assert "replicas" not in find(rendered, "Deployment", API)["spec"], "apply would undo the HPA's count"
    # CPU utilisation is measured against the request.
    assert container(find(rendered, "Deployment", API))["resources"]["requests"]["cpu"]


def test_the_worker_runs_two_replicas(rendered):
    """Two billing workers (they share the queue with SKIP LOCKED)."""
    assert find(rendered, "Deployment", WORKER)["spec"]["replicas"] == 2


@pytest.mark.parametrize("name", [API, WORKER])
def test_probes_ask_health_for_liveness_and_ready_for_readiness_on_the_service_port(rendered, name):
    """Liveness on /health (no database), readiness on /ready, on the port the process listens
    on (for the API, its own port, not the edge's: probes are never queued or shed)."""
    deployment = find(rendered, "Deployment", name)
    c = container(deployment)
    port_name = SERVICES[name]["port_name"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {port_name: SERVICES[name]["port"]}
    assert env(deployment)[SERVICES[name]["port_variable"]]["value"] == str(SERVICES[name]["port"])
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": port_name}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": port_name}


def test_every_container_requests_cpu_and_memory_and_has_a_memory_limit(rendered):
    """Deployments and the Job: CPU and memory requests, a memory limit no lower than the request."""
    for obj in workloads(rendered):
        name, resources = obj["metadata"]["name"], container(obj).get("resources", {})
        requests, limits = resources.get("requests", {}), resources.get("limits", {})
        assert {"cpu", "memory"} <= set(requests), f"{name}: requests {requests}"
        assert "memory" in limits, f"{name}: no memory limit"
        assert mebibytes(limits["memory"]) >= mebibytes(requests["memory"]), name


def test_every_pod_runs_as_the_images_user_read_only_and_unprivileged(rendered):
    """runAsNonRoot as the Dockerfile's UID, read-only root, no privilege escalation, no capability."""
    uid, gid = dockerfile_user()
    for obj in workloads(rendered):
        name, spec = obj["metadata"]["name"], pod_spec(obj)
        effective = {**spec["securityContext"], **container(obj)["securityContext"]}
        assert effective["runAsNonRoot"] is True, name
        assert (effective["runAsUser"], effective["runAsGroup"]) == (uid, gid), name
        assert effective["readOnlyRootFilesystem"] is True, name
        assert effective["allowPrivilegeEscalation"] is False, name
        assert effective["capabilities"] == {"drop": ["ALL"]}, name
        assert effective["seccompProfile"] == {"type": "RuntimeDefault"}, name
        # No API token for the Kubernetes API, and no docker-link variables that config.py could
        # mistake for its own (a Service named `appointments` sets APPOINTMENTS_PORT=tcp://...).
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["enableServiceLinks"] is False, name


@pytest.mark.parametrize("name", [API, WORKER])
def test_a_writable_tmp_backs_the_read_only_root(rendered, name):
    """/tmp is an emptyDir: waitress spills large responses to temporary files."""
    deployment = find(rendered, "Deployment", name)
    mounts = {m["mountPath"]: m["name"] for m in container(deployment)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize("name", [API, WORKER])
def test_the_grace_period_covers_the_prestop_sleep_and_the_shutdown(rendered, name):
    """preStop sleeps while endpoints drop the pod; the grace period fits that plus the shutdown."""
    deployment = find(rendered, "Deployment", name)
    sleep = container(deployment)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert sleep >= 5, "kube-proxy and ingresses need a few seconds to stop sending to the pod"
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert grace >= sleep + SHUTDOWN_SECONDS[name], f"{grace}s < {sleep}s preStop + {SHUTDOWN_SECONDS[name]}s shutdown"
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


@pytest.mark.parametrize("name", [API, WORKER])
def test_each_disruption_budget_selects_exactly_its_deployments_pods(rendered, name):
    """The PDB matches its Deployment's pods and no other pod; it lets one go at a time."""
    pdb = find(rendered, "PodDisruptionBudget", name)["spec"]
    selector = pdb["selector"]["matchLabels"]
    assert selects(selector, pod_labels(find(rendered, "Deployment", name)))
    others = [o for o in workloads(rendered) if o["metadata"]["name"] != name]
    assert not [o["metadata"]["name"] for o in others if selects(selector, pod_labels(o))]
    assert pdb["maxUnavailable"] == 1


@pytest.mark.parametrize("name", [API, WORKER])
def test_pods_spread_across_nodes(rendered, name):
    """At most one pod more on any node than on another (DoNotSchedule), counting its own pods."""
    deployment = find(rendered, "Deployment", name)
    by_key = {t["topologyKey"]: t for t in pod_spec(deployment)["topologySpreadConstraints"]}
    nodes = by_key["kubernetes.io/hostname"]
    assert (nodes["maxSkew"], nodes["whenUnsatisfiable"]) == (1, "DoNotSchedule")
    assert selects(nodes["labelSelector"]["matchLabels"], pod_labels(deployment))


@pytest.mark.parametrize("name", [API, WORKER])
def test_each_service_selects_its_deployments_pods_and_port(rendered, name):
    """The Service's selector matches its Deployment's pods only; it targets the named port,
    which for the API is the edge's, in front of it."""
    service = find(rendered, "Service", SERVICES[name]["service"])["spec"]
    deployment = find(rendered, "Deployment", name)
    assert selects(service["selector"], pod_labels(deployment))
    others = [o for o in workloads(rendered) if o["metadata"]["name"] != name]
    assert not [o["metadata"]["name"] for o in others if selects(service["selector"], pod_labels(o))]
    assert [p["targetPort"] for p in service["ports"]] == ["http"]
    owners = [c["name"] for c in all_containers(deployment) for p in c.get("ports", []) if p["name"] == "http"]
    assert owners == (["edge"] if name == API else ["worker"]), owners


def all_containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj)
    return [*spec.get("initContainers", []), *spec["containers"]]


# ---------------------------------------------------------------------------------------------
# The edge beside the API.


def edge(rendered) -> dict:
    (sidecar,) = pod_spec(find(rendered, "Deployment", API))["initContainers"]
    return sidecar


def test_the_api_pod_runs_the_edge_as_a_native_sidecar_with_the_repositorys_config(rendered):
    """HAProxy 2.6 as an init container that keeps running (restartPolicy Always: up before the
    API, stopped after it), with deploy/haproxy/haproxy.cfg exactly, in front of the API's port."""
    sidecar = edge(rendered)
    assert sidecar["name"] == "edge" and sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == "haproxy:2.6-bookworm"
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    assert mounts["/usr/local/etc/haproxy"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod_spec(find(rendered, "Deployment", API))["volumes"]}
    config_map = volumes[mounts["/usr/local/etc/haproxy"]["name"]]["configMap"]["name"]
    (rendered_config,) = [o for o in rendered if o["kind"] == "ConfigMap" and o["metadata"]["name"] == config_map]
    assert rendered_config["data"] == {"haproxy.cfg": EDGE_CONFIG.read_text()}
    variables = {e["name"]: e["value"] for e in sidecar["env"]}
    api_port = SERVICES[API]["port"]
    assert variables["CLINIC_API_SERVERS"] == f"127.0.0.1:{api_port}"
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert variables["CLINIC_EDGE_BIND"] == f":{ports['http']}" and variables["CLINIC_EDGE_METRICS_BIND"] == f":{ports['edge-metrics']}"
    assert all(port > 1024 for port in ports.values()), "the image's user binds no port under 1024"
    assert "CLINIC_EDGE_BIND" in EDGE_CONFIG.read_text() and "CLINIC_API_SERVERS" in EDGE_CONFIG.read_text()


def test_the_edge_runs_unprivileged_read_only_with_its_resources_and_probes(rendered):
    """The image's own user (99), read-only root with /tmp for its socket, no capability; CPU
    and memory requested, memory limited; its probes on its metrics port."""
    sidecar = edge(rendered)
    context = sidecar["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"], context["runAsNonRoot"]) == (99, 99, True)
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    socket_dir = {e["name"]: e["value"] for e in sidecar["env"]}["CLINIC_EDGE_ADMIN_SOCKET"].rsplit("/", 1)[0]
    volumes = {v["name"]: v for v in pod_spec(find(rendered, "Deployment", API))["volumes"]}
    assert "emptyDir" in volumes[{m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}[socket_dir]]
    assert {"cpu", "memory"} <= set(sidecar["resources"]["requests"]) and "memory" in sidecar["resources"]["limits"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert sidecar[probe]["httpGet"] == {"path": "/metrics", "port": "edge-metrics"}


# ---------------------------------------------------------------------------------------------
# The database connection, secrets and the migration.


def database_url(obj: dict):
    return urlsplit(env(obj)["DATABASE_URL"]["value"])


def secret_ref(obj: dict, variable: str) -> tuple[str, str]:
    ref = env(obj)[variable]["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


@pytest.mark.parametrize("name", [API, WORKER, MIGRATE])
def test_database_url_is_the_clusters_read_write_service_checked_with_its_ca(rendered, name):
    """DATABASE_URL: host <cluster>-rw, its database, TLS verified with the <cluster>-ca certificate."""
    obj = find(rendered, "Job" if name == MIGRATE else "Deployment", name)
    spec = find(rendered, "Cluster", CLUSTER)["spec"]
    url = database_url(obj)
    assert (url.scheme, url.hostname, url.port) == ("postgresql", f"{CLUSTER}-rw", 5432)
    assert url.path == "/" + spec["bootstrap"]["initdb"]["database"]
    assert url.password is None, "the password comes from a Secret as PGPASSWORD"
    query = {key: value for key, (value,) in parse_qs(url.query).items()}
    assert query["sslmode"] == "verify-full"
    mounts = {m["mountPath"]: m["name"] for m in container(obj)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(obj)["volumes"]}
    ca_dir, ca_file = query["sslrootcert"].rsplit("/", 1)
    assert volumes[mounts[ca_dir]]["secret"] == {"secretName": f"{CLUSTER}-ca", "items": [{"key": "ca.crt", "path": ca_file}]}


def test_each_service_logs_in_as_its_own_role_with_the_password_the_migration_sets(rendered):
    """clinic_api and clinic_worker, each with the Secret the Job sets that role's password from."""
    job = find(rendered, "Job", MIGRATE)
    assert set(SERVICES[n]["role"] for n in SERVICES) == set(db.ROLE_PASSWORD_VARIABLES)
    for name, service in SERVICES.items():
        deployment = find(rendered, "Deployment", name)
        assert database_url(deployment).username == service["role"]
        role_variable = db.ROLE_PASSWORD_VARIABLES[service["role"]]
        assert secret_ref(deployment, "PGPASSWORD") == secret_ref(job, role_variable)


def test_no_secret_value_is_written_into_a_manifest(rendered):
    """Passwords and tokens reach the pods only as secretKeyRef or a mounted Secret, never as a value."""
    secretish = re.compile(r"PASSWORD|TOKEN|SECRET|CREDENTIAL|_KEY$", re.I)
    for obj in workloads(rendered):
        name = obj["metadata"]["name"]
        for variable, item in env(obj).items():
            if variable == "API_TOKENS_FILE":
                continue  # a path, checked below
            if secretish.search(variable):
                assert set(item) == {"name", "valueFrom"} and "secretKeyRef" in item["valueFrom"], f"{name}: {variable}"
        assert "API_TOKENS" not in env(obj), f"{name}: tokens come from a mounted Secret (API_TOKENS_FILE)"
        for source in container(obj).get("envFrom", []):
            assert set(source) == {"configMapRef"}, f"{name}: envFrom {source}"
    for config in (o for o in rendered if o["kind"] == "ConfigMap"):
        assert not [key for key in config["data"] if secretish.search(key)]


@pytest.mark.parametrize("name", [API, WORKER])
def test_api_tokens_come_from_a_mounted_secret(rendered, name):
    """API_TOKENS_FILE names a file of a Secret volume, readable by the pod's group only."""
    deployment = find(rendered, "Deployment", name)
    directory, _ = env(deployment)["API_TOKENS_FILE"]["value"].rsplit("/", 1)
    mounts = {m["mountPath"]: m for m in container(deployment)["volumeMounts"]}
    assert mounts[directory]["readOnly"] is True
    volume = {v["name"]: v for v in pod_spec(deployment)["volumes"]}[mounts[directory]["name"]]
    assert volume["secret"]["defaultMode"] == 0o440


def test_the_migration_job_applies_the_schema_as_the_superuser_with_the_release_image(rendered):
    """The Job runs `python db.py apply-schema` as CloudNativePG's superuser, in the Deployments' image."""
    job = find(rendered, "Job", MIGRATE)
    assert container(job)["command"] == ["python", "db.py", "apply-schema"]
    assert pod_spec(job)["restartPolicy"] == "Never"
    images = {container(o)["image"] for o in workloads(rendered)}
    assert len(images) == 1 and not next(iter(images)).endswith(":latest"), images
    cluster = find(rendered, "Cluster", CLUSTER)["spec"]
    assert cluster["enableSuperuserAccess"] is True
    assert database_url(job).username == "postgres"
    assert secret_ref(job, "PGPASSWORD") == (f"{CLUSTER}-superuser", "password")
    # The Job's pods are no Service's and no PDB's.
    assert pod_labels(job)["app.kubernetes.io/component"] == "migration"


def test_the_deploy_guide_names_every_secret_the_manifests_reference(rendered):
    """docs/deploy.md tells how to make (or where to find) each Secret a pod reads."""
    names = set()
    for obj in workloads(rendered):
        names |= {item["valueFrom"]["secretKeyRef"]["name"] for item in env(obj).values() if "valueFrom" in item}
        names |= {v["secret"]["secretName"] for v in pod_spec(obj).get("volumes", []) if "secret" in v}
    cluster = find(rendered, "Cluster", CLUSTER)["spec"]
    names |= {ref["name"] for ref in cluster["backup"]["barmanObjectStore"]["s3Credentials"].values()}
    guide = DEPLOY_GUIDE.read_text()
    assert names and not sorted(n for n in names if n not in guide)
