"""The tools under test. Each maps a scenario to the command lines it runs (measured together) and
knows where its backup of a source blob lives (for the correctness check)."""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

from .azurite import BACKUP_ACCOUNT, BACKUP_KEY, SOURCE_ACCOUNT, SOURCE_KEY, Azurite

BENCH = Path(__file__).resolve().parents[1]


def account_sas(account: str, key: str) -> str:
    return generate_account_sas(
        account,
        key,
        resource_types=ResourceTypes(service=True, container=True, object=True),
        permission=AccountSasPermissions(read=True, write=True, delete=True, list=True, add=True, create=True, update=True, process=True),
        expiry=datetime.now(timezone.utc) + timedelta(days=1),
        protocol="https,http",
    )


class Tool:
    name = "?"
    # scenarios this tool takes part in
    scenarios = (1, 2, 3, 4)
    uses_queue = False

    def __init__(self, az: Azurite, work: Path):
        self.az = az
        self.work = work / self.name
        self.work.mkdir(parents=True, exist_ok=True)
        self.container = f"lake-{self.name}"

    @property
    def backup_container(self) -> str:
        return self.container

    def precreate_backup_container(self) -> bool:
        return True

    def precreate_queue(self) -> str | None:
        """A queue the deployment would have created (the tool does not create it)."""
        return None

    def backup_names(self, name: str, info) -> list[str]:
        return [name]

    def commands(self, scenario: int) -> list[list[str]]:
        raise NotImplementedError

    def env(self) -> dict:
        return dict(os.environ)

    def runnable(self) -> str | None:
        """None when runnable, else the reason it is not."""
        return None

    def scenario_runnable(self, scenario: int) -> str | None:
        """None when this scenario can run, else why not."""
        return None if scenario in self.scenarios else "scenario not supported by this tool"


class AzCopy(Tool):
    name = "azcopy"

    def __init__(self, az, work, binary: Path | str | None):  # str: why it is not installed
        super().__init__(az, work)
        self.binary = binary

    def runnable(self):
        if isinstance(self.binary, str):
            return self.binary
        return None if self.binary and self.binary.exists() else "azcopy binary not installed"

    def env(self):
        e = dict(os.environ)
        e.update(
            AZCOPY_LOG_LOCATION=str(self.work / "logs"),
            AZCOPY_JOB_PLAN_LOCATION=str(self.work / "plans"),
            AZCOPY_DISABLE_SYSLOG="true",
            AZCOPY_DISABLE_HIERARCHICAL_SCAN="true",
        )
        return e

    def commands(self, scenario):
        src = f"{self.az.blob_url(SOURCE_ACCOUNT)}/{self.container}?{account_sas(SOURCE_ACCOUNT, SOURCE_KEY)}"
        dst = f"{self.az.blob_url(BACKUP_ACCOUNT)}/{self.backup_container}?{account_sas(BACKUP_ACCOUNT, BACKUP_KEY)}"
        return [[str(self.binary), "sync", src, dst, "--from-to", "BlobBlob", "--recursive=true"]]


class Rclone(Tool):
    name = "rclone"

    def __init__(self, az, work, binary: Path | str | None):  # str: why it is not installed
        super().__init__(az, work)
        self.binary = binary
        self.conf = self.work / "rclone.conf"

    def runnable(self):
        if isinstance(self.binary, str):
            return self.binary
        return None if self.binary else "rclone not installed"

    def commands(self, scenario):
        self.conf.write_text(
            "[src]\ntype = azureblob\n"
            f"sas_url = {self.az.blob_url(SOURCE_ACCOUNT)}?{account_sas(SOURCE_ACCOUNT, SOURCE_KEY)}\n\n"
            "[dst]\ntype = azureblob\n"
            f"sas_url = {self.az.blob_url(BACKUP_ACCOUNT)}?{account_sas(BACKUP_ACCOUNT, BACKUP_KEY)}\n"
        )
        return [
            [
                str(self.binary), "--config", str(self.conf), "sync",
                f"src:{self.container}", f"dst:{self.backup_container}",
                "--server-side-across-configs", "--checksum", "--fast-list",
                "--transfers", "16", "--checkers", "16",
            ]
        ]


class Reference(Tool):
    """Seed 000's design (bench/reference/refdesign.py): producer + worker for 1 and 3,
    reconcile + worker for 2 and 4."""

    name = "reference"
    uses_queue = True

    @property
    def backup_container(self):
        return self.container + "bak"

    def precreate_backup_container(self):
        return False  # the design's worker creates it

    def backup_names(self, name, info):
        stem, ext = os.path.splitext(name)
        etag = info.etag.strip('"')
        return [f"{stem}_{info.last_modified}_{e}{ext}" for e in (etag, f'"{etag}"')]

    def env(self):
        e = dict(os.environ)
        e.update(
            REF_SOURCE_CS=self.az.source_cs,
            REF_BACKUP_CS=self.az.backup_cs,
            REF_QUEUE_CS=self.az.source_cs,
            REF_QUEUE="ref-backup",
            REF_SOURCE_SAS=account_sas(SOURCE_ACCOUNT, SOURCE_KEY),
        )
        return e

    def commands(self, scenario):
        prog = [sys.executable, str(BENCH / "reference" / "refdesign.py")]
        first = ["producer", "--container", self.container] if scenario in (1, 3) else ["reconcile", "--container", self.container]
        return [prog + first, prog + ["worker"]]


class Lakeguard(Tool):
    name = "lakeguard"
    scenarios = (1, 2, 3, 4, 5)
    uses_queue = True

    def __init__(self, az, work, binary: Path | None):
        super().__init__(az, work)
        self.binary = binary
        self.restore_at: str | None = None
        self.restore_prefix = ""
        self.restore_to = f"{self.container}-restored"

    def runnable(self):
        if not self.binary or not self.binary.exists():
            return f"lakeguard binary not found ({self.binary}); build it with cargo build --release"
        return None

    def precreate_backup_container(self):
        return False

    def precreate_queue(self):
        return "lg-backup"  # part of the deployment (the function app's queue); lakeguard does not create it

    NEEDS = {1: ("snapshot", "backup"), 2: ("reconcile", "backup"), 3: ("snapshot", "backup"),
             4: ("reconcile", "backup"), 5: ("restore",)}

    def subcommands(self) -> set[str]:
        if not hasattr(self, "_subs"):
            import re
            import subprocess

            text = subprocess.run([str(self.binary), "--help"], capture_output=True, text=True, timeout=30).stdout
            block = text.split("Commands:", 1)[-1].split("Options:", 1)[0]
            self._subs = set(re.findall(r"^\s{2}([a-z][a-z-]*)\s", block, re.M))
        return self._subs

    def scenario_runnable(self, scenario):
        why = super().scenario_runnable(scenario)
        if why:
            return why
        missing = [c for c in self.NEEDS[scenario] if c not in self.subcommands()]
        return f"this lakeguard build has no `{'`, `'.join(missing)}` subcommand yet" if missing else None

    def env(self):
        e = dict(os.environ)
        e.update(
            SourceStorage=self.az.source_cs,
            BackupStorage=self.az.backup_cs,
            AzureWebJobsStorage=self.az.source_cs,
            LAKEGUARD_BACKUP_QUEUE="lg-backup",
            LAKEGUARD_COPY_ENGINE="direct",
            LAKEGUARD_CONCURRENCY="16",
            LAKEGUARD_LOG="warn",
        )
        return e

    def commands(self, scenario):
        b = str(self.binary)
        # `--drain`: the worker consumes the queue while the producer (or reconcile) fills it, in
        # one process, as the queue trigger does in production.
        if scenario in (1, 3):
            return [[b, "snapshot", "--container", self.container, "--drain", "--output", "json"]]
        if scenario in (2, 4):
            return [[b, "reconcile", "--container", self.container, "--drain", "--output", "json"]]
        if scenario == 5:
            return [[
                b, "restore", "--container", self.container, "--prefix", self.restore_prefix,
                "--at", self.restore_at or "", "--to-container", self.restore_to, "--force", "--output", "json",
            ]]
        raise ValueError(scenario)
