"""Offline validation of the Azure deployment (azure.yaml + infra/) against the code.

Run by scripts/check-infra (which scripts/test calls). Azure is not reachable from here: these
tests prove syntax and consistency, not that Azure accepts the deployment (README: Deploy,
"What was validated offline").
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import shutil
import stat
import sys
import tempfile
import unittest
import zipfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import bicep_model as bm  # noqa: E402
import checks  # noqa: E402
import code_model as cm  # noqa: E402
import zip_layout  # noqa: E402

ROOT = checks.ROOT
FILES = checks.load()
MODEL = cm.read_settings()


class BicepSyntax(unittest.TestCase):
    def test_every_bicep_file_parses_without_error_nodes(self):
        paths = sorted((ROOT / "infra").rglob("*.bicep"))
        self.assertGreaterEqual(len(paths), 9, "infra/ lost Bicep files?")
        for p in paths:
            with self.subTest(file=str(p.relative_to(ROOT))):
                self.assertEqual(bm.syntax_problems(p.read_bytes()), [])

    def test_the_syntax_check_catches_broken_bicep(self):
        main = (ROOT / "infra" / "main.bicep").read_text()
        broken = [
            main.replace("targetScope = 'subscription'", "targetScope = 'subscription"),
            main.replace("module identity 'app/identity.bicep' = {", "module identity 'app/identity.bicep' = "),
            main.replace("name: 'identity'\n", "name: 'identity' 'x'\n"),
            main + "\nvar broken = union(a, b\n",
        ]
        for i, src in enumerate(broken):
            with self.subTest(mutation=i):
                self.assertNotEqual(src, main)
                self.assertNotEqual(bm.syntax_problems(src.encode()), [])


class SettingsAgainstCode(unittest.TestCase):
    def test_every_percent_expression_has_an_app_setting(self):
        exprs = checks.percent_expressions()
        self.assertEqual(
            set(exprs),
            {
                "LAKEGUARD_BACKUP_QUEUE",
                "LAKEGUARD_RECONCILE_QUEUE",
                "LAKEGUARD_RECONCILE_SCHEDULE",
                "LAKEGUARD_PRUNE_SCHEDULE",
                "LAKEGUARD_EVENT_QUEUE",
            },
            "function.json expressions changed: check the app settings and this test",
        )
        for df in (False, True):
            self.assertEqual(checks.percent_problems(checks.app_settings(FILES, df), exprs), [])

    def test_a_missing_percent_setting_is_reported(self):
        settings = checks.app_settings(FILES, False)
        del settings["LAKEGUARD_RECONCILE_QUEUE"]
        problems = checks.percent_problems(settings, checks.percent_expressions())
        self.assertEqual(len(problems), 1)
        self.assertIn("ReconcileWorker", problems[0])

    def test_settings_are_the_ones_settings_rs_reads_with_values_it_accepts(self):
        self.assertEqual(checks.settings_expression_problems(FILES), [])
        for df in (False, True):
            with self.subTest(deployDataFactory=df):
                s = checks.app_settings(FILES, df)
                self.assertEqual(checks.settings_problems(s, MODEL, df), [])
                self.assertEqual(checks.max_dequeue_problems(s), [])

    def test_wrong_settings_are_reported(self):
        base = checks.app_settings(FILES, False)
        cases = {
            "connection without credential": lambda s: s.pop("BackupStorage__credential"),
            "jobs without queue endpoint": lambda s: s.pop("AzureWebJobsStorage__queueServiceUri"),
            "typo": lambda s: s.__setitem__("LAKEGUARD_CONCURENCY", "4"),
            "number out of range": lambda s: s.__setitem__("LAKEGUARD_PRODUCER_BUDGET_SECS", "230"),
            "unknown engine": lambda s: s.__setitem__("LAKEGUARD_COPY_ENGINE", "azcopy"),
            "engine without factory": lambda s: s.__setitem__("LAKEGUARD_COPY_ENGINE", "datafactory"),
            "half a factory": lambda s: s.__setitem__("LAKEGUARD_DATAFACTORY_NAME", "adf"),
            "flex-unsupported": lambda s: s.__setitem__("FUNCTIONS_WORKER_RUNTIME", "custom"),
            "connection string": lambda s: s.__setitem__("SourceStorage", "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=aaaa"),
        }
        for name, mutate in cases.items():
            with self.subTest(case=name):
                s = copy.copy(base)
                mutate(s)
                self.assertNotEqual(checks.settings_problems(s, MODEL, False), [])
        s = copy.copy(base)
        s["LAKEGUARD_MAX_DEQUEUE_COUNT"] = "4"
        self.assertNotEqual(checks.max_dequeue_problems(s), [])

    def test_settings_rs_shape_changes_fail_loudly(self):
        with tempfile.TemporaryDirectory() as tmp:
            fake = pathlib.Path(tmp)
            (fake / "src").mkdir()
            text = (ROOT / "src" / "settings.rs").read_text()
            (fake / "src" / "settings.rs").write_text(text.replace("pub fn from_map(", "pub fn from_vars("))
            with self.assertRaises(cm.CodeShapeChanged):
                cm.read_settings(fake)
            (fake / "src" / "settings.rs").write_text(text.replace('number(vars, "LAKEGUARD_CONCURRENCY"', 'parse_num(vars, "LAKEGUARD_CONCURRENCY"'))
            with self.assertRaises(cm.CodeShapeChanged):
                cm.read_settings(fake)


class Roles(unittest.TestCase):
    def test_role_ids_are_documented_built_ins_or_custom_roles_of_the_template(self):
        self.assertEqual(checks.role_problems(FILES), [])

    def test_an_undocumented_role_id_is_reported(self):
        files = dict(FILES)
        with tempfile.NamedTemporaryFile("w", suffix=".bicep", dir=ROOT / "infra" / "app", delete=False) as tmp:
            tmp.write(
                "resource a 'Microsoft.Authorization/roleAssignments@2022-04-01' = {\n"
                "  name: 'x'\n  properties: {\n"
                "    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '8e3af657-a8ff-443c-a75c-2fe8c4bcb635')\n"
                "    principalId: 'p'\n  }\n}\n"
            )
        try:
            files["x"] = bm.BicepFile(pathlib.Path(tmp.name))
            problems = checks.role_problems(files)
        finally:
            os.unlink(tmp.name)
        self.assertEqual(len(problems), 2, problems)  # the literal GUID and the assignment

    def test_the_function_has_no_delete_right_on_the_backup_account(self):
        self.assertEqual(checks.backup_access_problems(FILES), [])
        perms = checks.custom_role_permissions(FILES["app/backup-access.bicep"], "backupWriter")
        self.assertIn("Microsoft.Storage/storageAccounts/blobServices/containers/blobs/write", perms["dataActions"])
        self.assertIn("Microsoft.Storage/storageAccounts/blobServices/generateUserDelegationKey/action", perms["actions"])

    def test_a_delete_right_in_the_backup_role_is_reported(self):
        perms = checks.custom_role_permissions(FILES["app/backup-access.bicep"], "backupWriter")
        for extra, key in [
            ("Microsoft.Storage/storageAccounts/blobServices/containers/blobs/delete", "dataActions"),
            ("Microsoft.Storage/storageAccounts/blobServices/containers/blobs/*", "dataActions"),
            ("Microsoft.Storage/storageAccounts/blobServices/containers/delete", "actions"),
            ("Microsoft.Storage/storageAccounts/blobServices/containers/blobs/deleteBlobVersion/action", "dataActions"),
        ]:
            with self.subTest(extra=extra):
                p = copy.deepcopy(perms)
                p[key].append(extra)
                self.assertNotEqual(checks.no_delete_problems(p, "test"), [])

    def test_the_pipeline_runner_role_only_starts_and_reads_runs(self):
        self.assertEqual(checks.pipeline_runner_problems(FILES), [])


class StorageAndLifecycle(unittest.TestCase):
    def test_accounts_are_keyless_https_tls12_private(self):
        self.assertEqual(checks.storage_problems(FILES), [])

    def test_lifecycle_expires_only_the_codes_bookkeeping_records(self):
        self.assertEqual(checks.lifecycle_problems(FILES, MODEL), [])


class AzdAndFunctionApp(unittest.TestCase):
    def test_modules_are_wired(self):
        self.assertEqual(checks.module_wiring_problems(FILES), [])

    def test_parameters_file_matches_main_bicep(self):
        self.assertEqual(checks.parameters_file_problems(FILES), [])

    def test_azure_yaml(self):
        self.assertEqual(checks.azure_yaml_problems(FILES), [])

    def test_flex_consumption_custom_handler(self):
        self.assertEqual(checks.function_app_problems(FILES), [])


class DataFactory(unittest.TestCase):
    def test_factory_loads_datafactory_json_and_its_identity_touches_only_the_backup(self):
        self.assertEqual(checks.datafactory_problems(FILES), [])


class CodePath(unittest.TestCase):
    def test_the_function_never_deletes_in_the_backup_account(self):
        calls = cm.backup_delete_calls()
        self.assertTrue(any(p == "src/ops/verify.rs" for p, _, _ in calls), "the drill's delete moved: update the allow list")
        self.assertEqual(checks.backup_delete_problems(calls), [])

    def test_functions_that_delete_backups_are_disabled(self):
        for df in (False, True):
            settings = checks.app_settings(FILES, df)
            self.assertEqual(checks.deleting_functions_problems(settings), [])
            del settings["AzureWebJobs.PruneNow.Disabled"]
            self.assertEqual(len(checks.deleting_functions_problems(settings)), 1)

    def test_a_new_backup_delete_is_reported(self):
        calls = cm.backup_delete_calls() + [("src/ops/watermark.rs", 1, "app.backup.delete(STATE, name)")]
        self.assertEqual(len(checks.backup_delete_problems(calls)), 1)


def build_fake_app(root: pathlib.Path, out: pathlib.Path, exec_bit: bool = True, skip_function: str | None = None) -> pathlib.Path:
    """dist/app and its zip in scripts/package's layout, with an ELF stub for the binary."""
    host = json.loads((root / "host.json").read_text())
    exe = host["customHandler"]["description"]["defaultExecutablePath"]
    app = out / "app"
    app.mkdir(parents=True)
    shutil.copy(root / "host.json", app / "host.json")
    for f in sorted((root / "functions").glob("*/function.json")):
        if f.parent.name == skip_function:
            continue
        (app / f.parent.name).mkdir()
        shutil.copy(f, app / f.parent.name / "function.json")
    (app / exe).write_bytes(b"\x7fELF" + b"\0" * 60)
    os.chmod(app / exe, 0o755 if exec_bit else 0o644)
    zpath = out / "lakeguard-app.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
        for dirpath, _, names in os.walk(app):
            for n in sorted(names):
                p = os.path.join(dirpath, n)
                info = zipfile.ZipInfo.from_file(p, os.path.relpath(p, app))
                with open(p, "rb") as fh:
                    z.writestr(info, fh.read(), zipfile.ZIP_DEFLATED)
    return zpath


class ZipLayout(unittest.TestCase):
    def test_scripts_package_builds_this_layout(self):
        pkg = (ROOT / "scripts" / "package").read_text()
        exe = json.loads((ROOT / "host.json").read_text())["customHandler"]["description"]["defaultExecutablePath"]
        for needle in ('cp host.json "$app/"', 'for f in functions/*/', 'cp "$f/function.json" "$app/$name/"',
                       f'"$app/{exe}"', f'chmod +x "$app/{exe}"', "ZipInfo.from_file"):
            self.assertIn(needle, pkg, "scripts/package's layout changed: update build_fake_app")

    def test_layout_of_a_package_like_zip(self):
        with tempfile.TemporaryDirectory() as tmp:
            z = build_fake_app(ROOT, pathlib.Path(tmp))
            self.assertEqual(zip_layout.check_zip(z), [])

    def test_layout_problems_are_reported(self):
        with tempfile.TemporaryDirectory() as tmp:
            z = build_fake_app(ROOT, pathlib.Path(tmp) / "a", exec_bit=False)
            self.assertTrue(any("executable bit" in p for p in zip_layout.check_zip(z)))
            z = build_fake_app(ROOT, pathlib.Path(tmp) / "b", skip_function="Reconcile")
            self.assertTrue(any("Reconcile" in p for p in zip_layout.check_zip(z)))
            plain = pathlib.Path(tmp) / "plain.zip"
            with zipfile.ZipFile(plain, "w") as zf:
                zf.writestr("host.json", (ROOT / "host.json").read_text())
            self.assertTrue(any("defaultExecutablePath" in p for p in zip_layout.check_zip(plain)))

    def test_packaged_zip_if_present(self):
        z = ROOT / "dist" / "lakeguard-app.zip"
        if not z.exists():
            self.skipTest("dist/lakeguard-app.zip not built (scripts/package); checked with a package-like zip above")
        self.assertEqual(zip_layout.check_zip(z), [])
        mode = (zipfile.ZipFile(z).getinfo("host.json").external_attr >> 16) & 0xFFFF
        self.assertTrue(stat.S_ISREG(mode))


if __name__ == "__main__":
    unittest.main()
