"""The structural checks of the deployment against the code. Each returns a list of problems
(empty = fine) so that the tests can also feed them deliberately broken inputs and prove that
they fail."""

from __future__ import annotations

import json
import pathlib
import re

import bicep_model as bm
import code_model as cm

ROOT = cm.ROOT
INFRA = ROOT / "infra"

# Built-in role definition ids, from Microsoft's built-in roles reference (checked for
# shared/notes/deploying-to-azure.md). A role id in the Bicep that is neither one of these nor a
# custom role defined in the same file is an error.
DOCUMENTED_BUILTIN_ROLES = {
    "storageBlobDataOwner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "storageBlobDataContributor": "ba92f5b4-2d11-453d-a403-e96b0029c9fe",
    "storageQueueDataContributor": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
    "storageTableDataContributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    "monitoringMetricsPublisher": "3913510d-42f4-4e42-8a64-420c390055eb",
    # Event Grid's delivery to the event queue (built-in roles reference, Storage section).
    "storageQueueDataMessageSender": "c6a89b2d-59bc-44d0-9896-0f6e12d7b80a",
}

# App settings that Flex Consumption does not support (functionAppConfig replaces them).
FLEX_UNSUPPORTED_SETTINGS = {
    "FUNCTIONS_WORKER_RUNTIME",
    "FUNCTIONS_WORKER_RUNTIME_VERSION",
    "FUNCTIONS_EXTENSION_VERSION",
    "FUNCTIONS_MAX_HTTP_CONCURRENCY",
    "FUNCTIONS_WORKER_PROCESS_COUNT",
    "FUNCTIONS_WORKER_DYNAMIC_CONCURRENCY_ENABLED",
    "SCM_DO_BUILD_DURING_DEPLOYMENT",
    "ENABLE_ORYX_BUILD",
    "WEBSITE_RUN_FROM_PACKAGE",
    "WEBSITE_CONTENTSHARE",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
    "WEBSITE_NODE_DEFAULT_VERSION",
    "WEBSITE_SKIP_CONTENTSHARE_VALIDATION",
    "WEBSITE_MAX_DYNAMIC_APPLICATION_SCALE_OUT",
}

CONNECTION_SUFFIXES = {"blobServiceUri", "queueServiceUri", "tableServiceUri", "accountName", "credential", "clientId"}

# Settings the platform or Application Insights reads (not lakeguard).
PLATFORM_SETTINGS = {"APPLICATIONINSIGHTS_CONNECTION_STRING", "APPLICATIONINSIGHTS_AUTHENTICATION_STRING"}

# Delete-like data actions and actions no role of the function may hold on the backup account.
DELETE_MARKERS = ("delete", "permanentdelete", "deleteblobversion", "runassuperuser", "*")


def load():
    return bm.load_all(ROOT)


# -- values across module boundaries -----------------------------------------------------------


def module_args(caller: bm.BicepFile, symbol: str) -> dict:
    d = caller.declaration(symbol)
    params = caller.prop(d.body, "params")
    return caller.object_nodes(params) if params is not None else {}


def resolve(files: dict, module_file: str, value, caller_symbol: str | None = None):
    """A module param's value as main.bicep passes it (one level: main -> module)."""
    if not isinstance(value, bm.ParamRef) or caller_symbol is None:
        return value
    main = files["main.bicep"]
    args = module_args(main, caller_symbol)
    node = args.get(value.param.name)
    if node is None:
        inner = value.param.default
        if value.stringified and isinstance(inner, int):
            inner = str(inner)
        return inner
    outer = main.eval(node)
    if value.stringified:
        if isinstance(outer, bm.ParamRef):
            return bm.ParamRef(outer.param, stringified=True)
        if isinstance(outer, int):
            return str(outer)
    return outer


def app_settings(files: dict, data_factory: bool) -> dict:
    """The function app's settings (key -> value as main.bicep resolves it)."""
    f = files["app/function.bicep"]
    base = f.var_value("baseSettings")
    chosen = dict(base)
    if data_factory:
        chosen.update(f.var_value("dataFactorySettings"))
    # The settings resource must be built from exactly these two objects.
    return {k: resolve(files, "app/function.bicep", v, "functionApp") for k, v in chosen.items()}


def settings_expression_problems(files: dict) -> list[str]:
    f = files["app/function.bicep"]
    node = f.vars.get("appSettings")
    problems = []
    if node is None or f.text(node) != "empty(dataFactoryName) ? baseSettings : union(baseSettings, dataFactorySettings)":
        problems.append("app/function.bicep: var appSettings is no longer `empty(dataFactoryName) ? baseSettings : union(baseSettings, dataFactorySettings)`; update infra/tests/checks.py")
    res = [d for d in f.resources("Microsoft.Web/sites/config") if f.eval(f.prop(d.body, "name")) == "appsettings"]
    if len(res) != 1 or f.text(f.prop(res[0].body, "properties")) != "appSettings":
        problems.append("app/function.bicep: the sites/config 'appsettings' resource must take `properties: appSettings`")
    if f.prop(f.resources("Microsoft.Web/sites")[0].body, "properties", "siteConfig", "appSettings") is not None:
        problems.append("app/function.bicep: siteConfig.appSettings would be replaced by the appsettings resource; keep all settings in baseSettings")
    main = files["main.bicep"]
    df_arg = main.text(module_args(main, "functionApp")["dataFactoryName"])
    if not df_arg.startswith("deployDataFactory ?"):
        problems.append("main.bicep: functionApp.dataFactoryName must be set exactly when deployDataFactory")
    return problems


# -- settings against the code ------------------------------------------------------------------


def percent_expressions(root: pathlib.Path = ROOT) -> dict[str, str]:
    """`%X%` in functions/*/function.json -> the function that needs it."""
    out = {}
    for path in sorted((root / "functions").glob("*/function.json")):
        for name in re.findall(r"%([A-Za-z0-9_]+)%", path.read_text()):
            out[name] = path.parent.name
    if not out:
        raise cm.CodeShapeChanged("functions/*/function.json: no %X% expression found")
    return out


def percent_problems(settings: dict, expressions: dict) -> list[str]:
    return [
        f"function {fn} uses %{name}% but the app has no setting {name} (the host would not load it)"
        for name, fn in sorted(expressions.items())
        if name not in settings or settings[name] in ("", None)
    ]


def _int_value(v):
    if isinstance(v, str) and v.isdigit():
        return [int(v)]
    if isinstance(v, bm.ParamRef):
        p = v.param
        vals = []
        if isinstance(p.default, int):
            vals.append(p.default)
        for dec in ("minValue", "maxValue"):
            if dec in p.decorators:
                vals.append(p.decorators[dec][0])
        if "minValue" not in p.decorators or "maxValue" not in p.decorators:
            return None  # unbounded parameter
        return vals
    return None


def _str_values(v):
    """Every value a setting may take: a literal, or a parameter's default and allowed values."""
    if isinstance(v, str):
        return [v]
    if isinstance(v, bm.OneOf):
        return [str(x) for x in v.values]
    if isinstance(v, bm.ParamRef):
        allowed = v.param.decorators.get("allowed")
        if allowed:
            return [str(a) for a in allowed[0]]
        if isinstance(v.param.default, str):
            return None  # free text
    return None


def settings_problems(settings: dict, model: cm.SettingsModel, data_factory: bool) -> list[str]:
    problems = []
    host_read = percent_expressions()
    # Connections: managed identity, the endpoint each one needs.
    needs = {"JOBS": ("blobServiceUri", "queueServiceUri"), "SOURCE": ("blobServiceUri",), "BACKUP": ("blobServiceUri",)}
    for const, name in model.connections.items():
        if name in settings:
            problems.append(f"{name}: a connection string setting; use {name}__* with the managed identity")
        for suffix in needs.get(const, ("blobServiceUri",)):
            if f"{name}__{suffix}" not in settings:
                problems.append(f"{name}__{suffix} missing (Settings::from_env needs connection {name})")
        if settings.get(f"{name}__credential") != "managedidentity":
            problems.append(f"{name}__credential must be `managedidentity` (got {settings.get(f'{name}__credential')!r})")
        if f"{name}__clientId" not in settings:
            problems.append(f"{name}__clientId missing: a user-assigned identity must be named")
    known_connections = set(model.connections.values())
    for key, value in settings.items():
        if "__" in key:
            conn, suffix = key.split("__", 1)
            if conn not in known_connections or suffix not in CONNECTION_SUFFIXES:
                problems.append(f"{key}: not a setting of a connection lakeguard reads")
            continue
        if key in PLATFORM_SETTINGS or re.fullmatch(r"AzureWebJobs\.[A-Za-z0-9]+\.Disabled", key):
            continue
        if key in FLEX_UNSUPPORTED_SETTINGS:
            problems.append(f"{key}: not supported on Flex Consumption")
            continue
        if key in host_read and key not in model.all_names:
            continue  # read by the host only (function.json), e.g. the timer schedule
        if key not in model.all_names:
            problems.append(f"{key}: Settings::from_env does not read it (typo?)")
            continue
        if key in model.numbers:
            n = model.numbers[key]
            vals = _int_value(value)
            if vals is None:
                problems.append(f"{key}: cannot tell that its value stays in {n.min}..={n.max}")
            for x in vals or []:
                if not n.min <= x <= n.max:
                    problems.append(f"{key}: value {x} outside {n.min}..={n.max} accepted by the code")
        if key in model.enums:
            vals = _str_values(value)
            if vals is None:
                problems.append(f"{key}: free value; the code accepts only {sorted(model.enums[key])}")
            for x in vals or []:
                x2 = x.lower() if key in model.case_insensitive else x
                if x2 not in model.enums[key]:
                    problems.append(f"{key}: `{x}` is not accepted by the code ({sorted(model.enums[key])})")
        if key in model.booleans:
            vals = _str_values(value) or []
            for x in vals:
                if x.lower() not in {"", "true", "false", "1", "0", "yes", "no"}:
                    problems.append(f"{key}: `{x}` is not a boolean the code accepts")
    # Data Factory: the three settings together, and the engine only with them.
    df_set = {k for k in model.datafactory_together if k in settings}
    if df_set and df_set != model.datafactory_together:
        problems.append(f"Data Factory settings must be set together: {sorted(model.datafactory_together)} (got {sorted(df_set)})")
    engine = settings.get("LAKEGUARD_COPY_ENGINE", "direct")
    if data_factory:
        if engine != "datafactory" or df_set != model.datafactory_together:
            problems.append("with deployDataFactory the engine must be `datafactory` with all LAKEGUARD_DATAFACTORY_* set")
    elif engine != "direct" or df_set:
        problems.append("without deployDataFactory the engine must be `direct` and no LAKEGUARD_DATAFACTORY_* set")
    # Queue names: Azure's rules, room for `-poison`, and the two queues differ.
    for key in ("LAKEGUARD_BACKUP_QUEUE", "LAKEGUARD_RECONCILE_QUEUE"):
        v = settings.get(key)
        default = v if isinstance(v, str) else (v.param.default if isinstance(v, bm.ParamRef) else None)
        if not isinstance(default, str) or not re.fullmatch(r"[a-z0-9](?:[a-z0-9]|-(?!-))*[a-z0-9]", default) or not 3 <= len(default) <= 63:
            problems.append(f"{key}: default {default!r} is not a valid queue name")
        if isinstance(v, bm.ParamRef) and v.param.decorators.get("maxLength", [99])[0] + len("-poison") > 63:
            problems.append(f"{key}: maxLength leaves no room for `-poison` (63 characters)")
    b, r = settings.get("LAKEGUARD_BACKUP_QUEUE"), settings.get("LAKEGUARD_RECONCILE_QUEUE")
    if isinstance(b, bm.ParamRef) and isinstance(r, bm.ParamRef) and b.param.default == r.param.default:
        problems.append("LAKEGUARD_BACKUP_QUEUE and LAKEGUARD_RECONCILE_QUEUE must differ")
    return problems


def max_dequeue_problems(settings: dict, root: pathlib.Path = ROOT) -> list[str]:
    host = json.loads((root / "host.json").read_text())
    want = str(host["extensions"]["queues"]["maxDequeueCount"])
    got = settings.get("LAKEGUARD_MAX_DEQUEUE_COUNT")
    if got != want:
        return [f"LAKEGUARD_MAX_DEQUEUE_COUNT is {got!r}, host.json maxDequeueCount is {want}: they must match"]
    return []


# -- roles --------------------------------------------------------------------------------------


def role_problems(files: dict) -> list[str]:
    problems = []
    roles = json.loads((INFRA / "roles.json").read_text())
    roles = {k: v for k, v in roles.items() if not k.startswith("$")}
    for k, v in roles.items():
        if DOCUMENTED_BUILTIN_ROLES.get(k) != v:
            problems.append(f"infra/roles.json: {k} = {v} is not the documented built-in id")
    for rel, f in files.items():
        custom = {d.symbol for d in f.resources("Microsoft.Authorization/roleDefinitions")}
        for g in f.guid_literals():
            if g not in DOCUMENTED_BUILTIN_ROLES.values():
                problems.append(f"{rel}: literal GUID {g} is not a documented built-in role id")
        for d in f.resources("Microsoft.Authorization/roleAssignments"):
            node = f.prop(d.body, "properties", "roleDefinitionId")
            text = f.text(node) if node is not None else ""
            m = re.fullmatch(r"subscriptionResourceId\('Microsoft\.Authorization/roleDefinitions', (\w+)\.(\w+)\)", text)
            if m and m.group(1) == "roles" and m.group(2) in roles and f.vars.get("roles") is not None and f.text(f.vars["roles"]) == "loadJsonContent('../roles.json')":
                continue
            m2 = re.fullmatch(r"(\w+)\.id", text)
            if m2 and m2.group(1) in custom:
                continue
            if text == "subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleId)":
                continue  # a loop over role ids: checked below
            problems.append(f"{rel}: role assignment {d.symbol} uses `{text}`, neither a documented built-in nor a custom role of this file")
        # Loops over role ids (`for roleId in grants`): every element must be roles.X.
        for d in f.resources("Microsoft.Authorization/roleAssignments"):
            node = f.prop(d.body, "properties", "roleDefinitionId")
            if node is not None and "roleId" in f.text(node):
                grants = f.vars.get("grants")
                if grants is None:
                    problems.append(f"{rel}: {d.symbol} loops over role ids without a `grants` var")
                    continue
                for el in grants.named_children:
                    t = f.text(el)
                    if not (t.startswith("roles.") and t.split(".", 1)[1] in roles):
                        problems.append(f"{rel}: grants element `{t}` is not a documented built-in role")
    return problems


def custom_role_permissions(f: bm.BicepFile, symbol: str) -> dict:
    d = f.declaration(symbol)
    perms = f.eval(f.prop(d.body, "properties", "permissions"))
    out = {"actions": [], "notActions": [], "dataActions": [], "notDataActions": []}
    for p in perms:
        for k in out:
            out[k] += p.get(k, [])
    return out


def no_delete_problems(perms: dict, what: str) -> list[str]:
    problems = []
    for action in perms["actions"] + perms["dataActions"]:
        low = action.lower()
        if any(marker in low for marker in DELETE_MARKERS):
            problems.append(f"{what}: grants `{action}`, a delete (or wildcard) right")
    must_exclude = {
        "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/delete",
        "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/deleteBlobVersion/action",
        "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/permanentDelete/action",
    }
    for a in sorted(must_exclude - set(perms["notDataActions"])):
        problems.append(f"{what}: notDataActions should list `{a}`")
    return problems


def backup_access_problems(files: dict) -> list[str]:
    """The function's identity holds no delete right on the backup account (separate mode)."""
    f = files["app/backup-access.bicep"]
    problems = no_delete_problems(custom_role_permissions(f, "backupWriter"), "backup writer role")
    roles = {k: v for k, v in json.loads((INFRA / "roles.json").read_text()).items() if not k.startswith("$")}
    for d in f.resources("Microsoft.Authorization/roleAssignments"):
        principal = f.text(f.prop(d.body, "properties", "principalId"))
        role = f.text(f.prop(d.body, "properties", "roleDefinitionId"))
        if principal in ("functionPrincipalId", "factoryPrincipalId") and role != "backupWriter.id":
            problems.append(f"backup-access: {principal} gets `{role}`, not the no-delete backup writer role")
        if principal == "operatorPrincipalId" and "storageBlobDataContributor" not in role:
            problems.append("backup-access: the operator should get Storage Blob Data Contributor")
        if principal not in ("functionPrincipalId", "factoryPrincipalId", "operatorPrincipalId"):
            problems.append(f"backup-access: unexpected principal `{principal}`")
    main = files["main.bicep"]
    args = module_args(main, "backupAccess")
    if main.text(args["functionPrincipalId"]) != "backupSharedWithJobs ? '' : identity.outputs.principalId":
        problems.append("main.bicep: backupAccess.functionPrincipalId must be the function identity (separate backup account)")
    # The function identity gets no built-in data role with delete on the backup account from any
    # other module either: only jobs-access (the jobs account) and source-access assign to it.
    for sym in ("jobsAccess", "source", "monitoring", "dataFactory"):
        scope = main.text(main.prop(main.declaration(sym).body, "scope"))
        if "backupRg" in scope:
            problems.append(f"main.bicep: {sym} is deployed in the backup resource group")
    del roles
    return problems


def pipeline_runner_problems(files: dict) -> list[str]:
    f = files["app/datafactory.bicep"]
    perms = custom_role_permissions(f, "pipelineRunner")
    problems = []
    allowed = {
        "microsoft.datafactory/factories/pipelines/createrun/action",
        "microsoft.datafactory/factories/pipelineruns/read",
        "microsoft.datafactory/factories/querypipelineruns/action",
        "microsoft.datafactory/factories/querypipelineruns/read",
    }
    for a in perms["actions"] + perms["dataActions"]:
        if a.lower() not in allowed:
            problems.append(f"pipeline runner role: `{a}` is more than starting and reading runs")
    return problems


# -- storage, lifecycle -------------------------------------------------------------------------


def storage_problems(files: dict) -> list[str]:
    problems = []
    want = {
        "allowSharedKeyAccess": False,
        "allowBlobPublicAccess": False,
        "supportsHttpsTrafficOnly": True,
        "minimumTlsVersion": "TLS1_2",
    }
    count = 0
    for rel, f in files.items():
        for d in f.resources("Microsoft.Storage/storageAccounts"):
            count += 1
            props = f.prop(d.body, "properties")
            for k, v in want.items():
                got = f.eval(f.prop(props, k)) if f.prop(props, k) is not None else None
                if got != v:
                    problems.append(f"{rel}: storage account {d.symbol}: {k} is {got!r}, must be {v!r}")
    if count == 0:
        problems.append("no storage account resource found")
    return problems


def lifecycle_problems(files: dict, model: cm.SettingsModel) -> list[str]:
    problems = []
    container = cm.state_container()
    code = cm.bookkeeping_prefixes()
    want = sorted(f"{container}/{p}" for p in code.values())
    main = files["main.bicep"]
    got = main.var_value("bookkeepingPrefixes")
    if sorted(got) != want:
        problems.append(f"main.bicep bookkeepingPrefixes {got} != the code's record prefixes {want}")
    for p in got:
        for keep in ("producer/", "coverage/"):
            if f"{container}/{keep}".startswith(p):
                problems.append(f"lifecycle prefix {p} would expire {container}/{keep} (watermarks/coverage)")
        if not p.startswith(f"{container}/"):
            problems.append(f"lifecycle prefix {p} is outside lakeguard's state container: it could touch backups")
    for sym in ("jobsStorage", "backupStorage"):
        arg = main.text(module_args(main, sym)["expiringPrefixes"])
        if "bookkeepingPrefixes" not in arg or not re.fullmatch(r"(backupSharedWithJobs \? )?bookkeepingPrefixes( : \[\])?", arg):
            problems.append(f"main.bicep: {sym}.expiringPrefixes must be bookkeepingPrefixes (or [] for the jobs account when not shared)")
    st = files["app/storage.bicep"]
    pol = st.resources("Microsoft.Storage/storageAccounts/managementPolicies")
    if len(pol) != 1:
        problems.append("storage.bicep: expected exactly one lifecycle policy")
    else:
        rules = st.prop(pol[0].body, "properties", "policy", "rules")
        if len(rules.named_children) != 1:
            problems.append("storage.bicep: the lifecycle policy must have exactly the bookkeeping rule")
        else:
            rule = rules.named_children[0]
            pm = st.prop(rule, "definition", "filters", "prefixMatch")
            if pm is None or st.text(pm) != "expiringPrefixes":
                problems.append("storage.bicep: the lifecycle rule must filter on expiringPrefixes only")
    days = main.params["bookkeepingRetentionDays"]
    ttl = model.numbers["LAKEGUARD_PENDING_TTL_SECS"].default
    if days.decorators.get("minValue", [0])[0] * 86400 <= ttl:
        problems.append(f"bookkeepingRetentionDays minValue must exceed LAKEGUARD_PENDING_TTL_SECS ({ttl} s)")
    return problems


# -- azd ----------------------------------------------------------------------------------------


def module_wiring_problems(files: dict) -> list[str]:
    """Every module path exists, every argument is a declared param, every required param is given."""
    problems = []
    for rel, f in files.items():
        for d in f.modules():
            target = (f.path.parent / d.target).resolve()
            key = str(target.relative_to(INFRA.resolve())) if target.is_relative_to(INFRA.resolve()) else None
            if key not in files:
                problems.append(f"{rel}: module {d.symbol} -> {d.target} not found")
                continue
            mod = files[key]
            args = module_args(f, d.symbol)
            for a in args:
                if a not in mod.params:
                    problems.append(f"{rel}: module {d.symbol} passes `{a}`, which {key} does not declare")
            for name, p in mod.params.items():
                if p.default is bm.NO_DEFAULT and name not in args:
                    problems.append(f"{rel}: module {d.symbol} does not pass required param `{name}` of {key}")
            for name, node in args.items():
                p = mod.params.get(name)
                allowed = p.decorators.get("allowed") if p else None
                v = f.eval(node)
                if allowed and isinstance(v, (str, int)) and v not in allowed[0]:
                    problems.append(f"{rel}: module {d.symbol} passes {name}={v!r}, not allowed by {key}")
    return problems


def parameters_file_problems(files: dict) -> list[str]:
    main = files["main.bicep"]
    doc = json.loads((INFRA / "main.parameters.json").read_text())
    given = set(doc["parameters"])
    problems = [f"main.parameters.json sets `{p}`, which main.bicep does not declare" for p in sorted(given - set(main.params))]
    for name, p in main.params.items():
        if p.default is bm.NO_DEFAULT and name not in given:
            problems.append(f"main.parameters.json does not set required param `{name}`")
    for name, v in doc["parameters"].items():
        value = v.get("value")
        if not (isinstance(value, str) and re.fullmatch(r"\$\{[A-Z0-9_]+(=[^}]*)?\}", value)):
            problems.append(f"main.parameters.json: {name} should come from the azd environment (${{VAR}} or ${{VAR=default}})")
            continue
        m = re.fullmatch(r"\$\{[A-Z0-9_]+=([^}]*)\}", value)
        p = main.params.get(name)
        if m and p is not None:
            default = m.group(1)
            typed = {"int": lambda s: int(s), "bool": lambda s: {"true": True, "false": False}[s]}.get(p.type, str)(default)
            allowed = p.decorators.get("allowed")
            if allowed and typed not in allowed[0]:
                problems.append(f"main.parameters.json: default of {name} ({default}) is not allowed")
            if "minValue" in p.decorators and typed < p.decorators["minValue"][0]:
                problems.append(f"main.parameters.json: default of {name} below minValue")
            if "maxValue" in p.decorators and typed > p.decorators["maxValue"][0]:
                problems.append(f"main.parameters.json: default of {name} above maxValue")
            if p.default is not bm.NO_DEFAULT and typed != p.default:
                problems.append(f"main.parameters.json: default of {name} ({typed!r}) differs from main.bicep's ({p.default!r})")
    return problems


def azure_yaml_problems(files: dict) -> list[str]:
    import yaml

    doc = yaml.safe_load((ROOT / "azure.yaml").read_text())
    problems = []
    services = doc.get("services") or {}
    if len(services) != 1:
        return [f"azure.yaml: expected one service, found {list(services)}"]
    (name, svc), = services.items()
    for k, v in {"host": "function", "language": "custom", "project": ".", "dist": "dist/app"}.items():
        if svc.get(k) != v:
            problems.append(f"azure.yaml: services.{name}.{k} is {svc.get(k)!r}, expected {v!r}")
    pre = (svc.get("hooks") or {}).get("prepackage") or {}
    if "scripts/package" not in str(pre.get("run", "")):
        problems.append("azure.yaml: the service's prepackage hook must run scripts/package")
    post = (doc.get("hooks") or {}).get("postdeploy") or {}
    script = ROOT / str(post.get("run", ""))
    if not script.is_file() or not script.stat().st_mode & 0o111:
        problems.append(f"azure.yaml: postdeploy hook `{post.get('run')}` is not an executable file")
    else:
        outputs = set(files["main.bicep"].outputs)
        for var in set(re.findall(r"\$\{?((?:AZURE|LAKEGUARD)_[A-Z0-9_]+)", script.read_text())):
            if var not in outputs:
                problems.append(f"{post.get('run')}: uses ${var}, which infra/main.bicep does not output")
    infra = doc.get("infra") or {}
    if not (ROOT / infra.get("path", "infra") / f"{infra.get('module', 'main')}.bicep").is_file():
        problems.append("azure.yaml: infra path/module does not name infra/main.bicep")
    f = files["app/function.bicep"]
    if f.params["serviceName"].default != name:
        problems.append(f"function.bicep serviceName default {f.params['serviceName'].default!r} != azure.yaml service `{name}` (azd finds the app by its azd-service-name tag)")
    if "serviceName" in module_args(files["main.bicep"], "functionApp"):
        problems.append("main.bicep must not override functionApp.serviceName")
    dist = svc.get("dist", "")
    pkg = (ROOT / "scripts" / "package").read_text()
    if dist != "dist/app" or 'app="$out/app"' not in pkg or "out=dist" not in pkg:
        problems.append("azure.yaml dist must be the app folder scripts/package builds (dist/app)")
    return problems


def function_app_problems(files: dict) -> list[str]:
    f = files["app/function.bicep"]
    problems = []
    plans = f.resources("Microsoft.Web/serverfarms")
    sites = f.resources("Microsoft.Web/sites")
    if len(plans) != 1 or len(sites) != 1:
        return ["function.bicep: expected one plan and one site"]
    sku = f.eval(f.prop(plans[0].body, "sku"))
    if sku != {"tier": "FlexConsumption", "name": "FC1"}:
        problems.append(f"plan sku {sku} is not Flex Consumption FC1")
    cfg = f.prop(sites[0].body, "properties", "functionAppConfig")
    runtime = f.eval(f.prop(cfg, "runtime"))
    if runtime != {"name": "custom", "version": "1.0"}:
        problems.append(f"functionAppConfig.runtime is {runtime}, expected custom 1.0")
    auth = f.eval(f.prop(cfg, "deployment", "storage", "authentication", "type"))
    if auth != "UserAssignedIdentity":
        problems.append("deployment storage must authenticate with the user-assigned identity")
    for k in ("maximumInstanceCount", "instanceMemoryMB"):
        if f.prop(cfg, "scaleAndConcurrency", k) is None:
            problems.append(f"scaleAndConcurrency.{k} missing")
    ident = f.eval(f.prop(sites[0].body, "identity", "type"))
    if ident != "UserAssigned":
        problems.append("the site must use the user-assigned identity")
    host = json.loads((ROOT / "host.json").read_text())
    prefix = host["extensions"]["http"]["routePrefix"]
    route = json.loads((ROOT / "functions" / "SnapshotProducer" / "function.json").read_text())["bindings"][0]["route"]
    main = files["main.bicep"]
    url = main.text(main.outputs["LAKEGUARD_PRODUCER_URL"])
    if not url.endswith(f"/{prefix}/{route}'"):
        problems.append(f"LAKEGUARD_PRODUCER_URL {url} does not end with /{prefix}/{route}")
    for out in ("AZURE_FUNCTION_NAME", "AZURE_FUNCTION_URL", "LAKEGUARD_PRODUCER_URL", "AZURE_RESOURCE_GROUP", "LAKEGUARD_IDENTITY_CLIENT_ID"):
        if out not in main.outputs:
            problems.append(f"main.bicep does not output {out}")
    queues = main.var_value("queueNames")
    texts = [main.text(n) for n in main.vars["queueNames"].named_children]
    for q in ("backupQueueName", "'${backupQueueName}-poison'", "reconcileQueueName", "'${reconcileQueueName}-poison'"):
        if q not in texts:
            problems.append(f"main.bicep queueNames lacks {q}")
    del queues
    if main.target_scope != "subscription":
        problems.append("main.bicep must deploy at subscription scope (it creates the resource groups)")
    src = main.text(main.prop(main.declaration("source").body, "scope"))
    if src != "resourceGroup(sourceSubscriptionId, sourceResourceGroupName)":
        problems.append("the source role assignment must be deployed at the source account's own resource group")
    return problems


# -- Data Factory -------------------------------------------------------------------------------


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _activities(acts):
    for a in acts:
        yield a
        tp = a.get("typeProperties", {})
        for k in ("ifTrueActivities", "ifFalseActivities", "activities"):
            yield from _activities(tp.get(k, []))


def datafactory_problems(files: dict) -> list[str]:
    f = files["app/datafactory.bicep"]
    problems = []
    loaded = {}
    for name in ("linkedService", "dataset", "pipeline"):
        v = f.var_value(name)
        if not isinstance(v, dict) or "properties" not in v or "name" not in v:
            problems.append(f"datafactory.bicep: var {name} is not a loaded datafactory/ JSON document")
            continue
        loaded[name] = v
        for s in _strings(v):
            if s.startswith("["):
                problems.append(f"datafactory/{name}: string {s[:40]!r} starts with `[`: ARM would evaluate it as a template expression")
    if "pipeline" not in loaded:
        return problems
    # The factory's managed identity is used only against the backup account: each MSI Web
    # activity's URL and each dataset's endpoint come from backupBlobEndpoint. If the pipeline
    # starts reading the source with the factory's identity, it needs a role there too.
    for act in _activities(loaded["pipeline"]["properties"]["activities"]):
        tp = act.get("typeProperties", {})
        if act.get("type") == "WebActivity" and tp.get("authentication", {}).get("type") == "MSI":
            url = tp.get("url", {})
            url = url.get("value", "") if isinstance(url, dict) else url
            if not url.startswith("@concat(pipeline().parameters.backupBlobEndpoint,"):
                problems.append(f"pipeline activity {act['name']}: the factory identity calls `{url[:60]}`, not the backup account: grant it a role there (infra/app/*-access.bicep)")
        ds = tp.get("dataset")
        if ds:
            ep = ds.get("parameters", {}).get("blobEndpoint", {}).get("value")
            if ep != "@pipeline().parameters.backupBlobEndpoint":
                problems.append(f"pipeline activity {act['name']}: dataset endpoint `{ep}` is not the backup account")
    if loaded["dataset"]["properties"]["linkedServiceName"]["referenceName"] != loaded["linkedService"]["name"]:
        problems.append("dataset does not use the deployed linked service")
    return problems


# -- code path ---------------------------------------------------------------------------------

# Deletes through the backup store that are allowed: CLI-only operations that run under an
# operator's identity, never in the function.
ALLOWED_BACKUP_DELETES = {
    "src/ops/verify.rs": "verify --restore-drill removes its scratch container (CLI only)",
    # Prune is the one operation that deletes backups. Its functions (Prune, PruneNow) are
    # disabled in the deployment (`AzureWebJobs.<name>.Disabled`, checked below): it runs
    # under an operator identity with the CLI.
    "src/ops/prune.rs": "lakeguard prune (operator identity); its functions are disabled in infra",
}

# Functions whose code deletes in the backup account: the deployment must disable them.
DELETING_FUNCTIONS = ("Prune", "PruneNow")


def backup_delete_problems(calls) -> list[str]:
    problems = []
    for path, line, text in calls:
        if path not in ALLOWED_BACKUP_DELETES:
            problems.append(
                f"{path}:{line}: `{text}` deletes in the backup account; the function's role has no delete right (infra/app/backup-access.bicep). Run it under the operator identity, or update the role and README"
            )
    handler = ROOT / "src" / "handler"
    for path in sorted(handler.rglob("*.rs")):
        if re.search(r"\bverify::", path.read_text()):
            problems.append(f"{path.relative_to(ROOT)} calls ops::verify: its restore drill deletes in the backup account")
    return problems


def deleting_functions_problems(settings: dict) -> list[str]:
    """Every function that would delete backups is disabled by an app setting."""
    return [
        f"function {f} deletes in the backup account but is not disabled (AzureWebJobs.{f}.Disabled = 'true')"
        for f in DELETING_FUNCTIONS
        if str(settings.get(f"AzureWebJobs.{f}.Disabled", "")).lower() != "true"
    ]
