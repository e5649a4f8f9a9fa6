"""Tests of scripts/check-package: each problem it must find, on synthetic packages.

    python3 -m unittest discover -s tests/package -p '*_test.py'      (run by scripts/test)

The ELFs are written here byte by byte (header, .dynstr, .dynamic, .gnu.version_r, section
headers), so the tests need no compiler and pin the parser to the ELF layout, not to one binary.
With LAKEGUARD_PACKAGE_ZIP set (scripts/test does), the real package is also checked, and
damaged copies of it (its executable bit dropped, a GLIBC_2.28 renamed GLIBC_2.34 in place,
e_machine changed) must fail.
"""

import contextlib
import importlib.machinery
import importlib.util
import io
import os
import struct
import tempfile
import unittest
import zipfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
_loader = importlib.machinery.SourceFileLoader(
    "check_package", os.path.join(ROOT, "scripts", "check-package")
)
_spec = importlib.util.spec_from_loader("check_package", _loader)
cp = importlib.util.module_from_spec(_spec)
_loader.exec_module(cp)


def make_elf(needed=("libc.so.6",), versions=None, machine=62, e_type=3, elf_class=2):
    """A minimal ELF64 with a dynamic section and a version-needs section.

    versions: {library: [version names]}; default {"libc.so.6": ["GLIBC_2.2.5", "GLIBC_2.28"]}.
    """
    if versions is None:
        versions = {"libc.so.6": ["GLIBC_2.2.5", "GLIBC_2.28"]}
    strtab = bytearray(b"\0")

    def s(text):
        off = len(strtab)
        strtab.extend(text.encode() + b"\0")
        return off

    dynamic = b"".join(struct.pack("<qQ", 1, s(lib)) for lib in needed) + struct.pack("<qQ", 0, 0)
    verneed = bytearray()
    libs = list(versions.items())
    for i, (lib, names) in enumerate(libs):
        file_off = s(lib)
        last = i == len(libs) - 1
        size = 16 + 16 * len(names)
        verneed += struct.pack("<HHIII", 1, len(names), file_off, 16, 0 if last else size)
        for j, name in enumerate(names):
            nxt = 0 if j == len(names) - 1 else 16
            verneed += struct.pack("<IHHII", 0, 0, j + 2, s(name), nxt)
    shstr = b"\0.dynstr\0.dynamic\0.gnu.version_r\0.shstrtab\0"
    body = bytearray(b"\0" * 64)
    offs = {}
    for name, blob in (("dynstr", bytes(strtab)), ("dynamic", dynamic), ("verneed", bytes(verneed)), ("shstr", shstr)):
        while len(body) % 8:
            body.append(0)
        offs[name] = (len(body), len(blob))
        body += blob
    while len(body) % 8:
        body.append(0)
    shoff = len(body)

    def sh(name, sh_type, key, link=0, info=0):
        off, size = offs[key] if key else (0, 0)
        return struct.pack("<IIQQQQIIQQ", name, sh_type, 0, 0, off, size, link, info, 8, 0)

    sections = [
        sh(0, 0, None),
        sh(1, 3, "dynstr"),
        sh(9, cp.SHT_DYNAMIC, "dynamic", link=1),
        sh(18, cp.SHT_GNU_VERNEED, "verneed", link=1, info=len(libs)),
        sh(33, 3, "shstr"),
    ]
    body += b"".join(sections)
    ident = b"\x7fELF" + bytes([elf_class, 1, 1, 0]) + b"\0" * 8
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", e_type, machine, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(sections), 4
    )
    body[:64] = header
    return bytes(body)


HOST = b'{"customHandler": {"description": {"defaultExecutablePath": "lakeguard", "arguments": ["serve"]}}}'
FUNCTION = b'{"bindings": [{"type": "queueTrigger", "direction": "in", "name": "m"}]}'


def make_zip(binary=None, mode=0o100755, host=HOST, functions=("BackupWorker", "Restore"), extra=None):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        if host is not None:
            z.writestr("host.json", host)
        if binary is not None:
            info = zipfile.ZipInfo("lakeguard")
            info.create_system = 3
            info.external_attr = mode << 16
            z.writestr(info, binary)
        for f in functions:
            z.writestr(f + "/function.json", FUNCTION)
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return buf.getvalue()


class CheckPackage(unittest.TestCase):
    def check(self, data, functions_dir=None, max_glibc="2.28"):
        with tempfile.NamedTemporaryFile(suffix=".zip", delete=False) as f:
            f.write(data)
        try:
            return cp.check_zip(f.name, max_glibc, functions_dir)
        finally:
            os.unlink(f.name)

    def assertProblem(self, problems, fragment):
        self.assertTrue(any(fragment in p for p in problems), "%r not in %r" % (fragment, problems))

    def test_a_good_package_passes(self):
        self.assertEqual(self.check(make_zip(make_elf())), [])

    def test_the_parser_reads_needed_libraries_and_versions(self):
        elf = cp.parse_elf(
            make_elf(
                needed=("libc.so.6", "libm.so.6"),
                versions={"libm.so.6": ["GLIBC_2.2.5"], "libc.so.6": ["GLIBC_2.3", "GLIBC_2.17"]},
            )
        )
        self.assertEqual(elf["needed"], ["libc.so.6", "libm.so.6"])
        self.assertEqual(elf["versions"], {"libm.so.6": ["GLIBC_2.2.5"], "libc.so.6": ["GLIBC_2.3", "GLIBC_2.17"]})
        self.assertEqual(elf["machine"], 62)

    def test_a_glibc_version_above_the_baseline_fails(self):
        problems = self.check(make_zip(make_elf(versions={"libc.so.6": ["GLIBC_2.2.5", "GLIBC_2.34"]})))
        self.assertProblem(problems, "GLIBC_2.34")
        # Compared as numbers, not text: 2.3 < 2.28 < 2.100.
        self.assertEqual(self.check(make_zip(make_elf(versions={"libc.so.6": ["GLIBC_2.3"]}))), [])
        self.assertProblem(self.check(make_zip(make_elf(versions={"libc.so.6": ["GLIBC_2.100"]}))), "GLIBC_2.100")
        # The baseline itself is allowed; a higher --max-glibc admits more.
        self.assertEqual(self.check(make_zip(make_elf(versions={"libm.so.6": ["GLIBC_2.29"]})), max_glibc="2.31"), [])

    def test_not_x86_64_or_not_elf_fails(self):
        self.assertProblem(self.check(make_zip(make_elf(machine=183))), "not x86-64")  # aarch64
        self.assertProblem(self.check(make_zip(make_elf(elf_class=1))), "not a 64-bit ELF")
        self.assertProblem(self.check(make_zip(b"#!/bin/sh\nexec true\n")), "not an ELF")
        self.assertProblem(self.check(make_zip(make_elf(e_type=1))), "not an executable")

    def test_a_library_outside_glibc_fails(self):
        problems = self.check(make_zip(make_elf(needed=("libc.so.6", "libssl.so.3"))))
        self.assertProblem(problems, "libssl.so.3")

    def test_the_executable_bit_is_required(self):
        self.assertProblem(self.check(make_zip(make_elf(), mode=0o100644)), "not executable")
        self.assertProblem(self.check(make_zip(make_elf(), mode=0)), "no Unix regular-file mode")

    def test_host_json_and_the_executable_must_be_there(self):
        self.assertProblem(self.check(make_zip(make_elf(), host=None)), "host.json is not at the root")
        self.assertProblem(self.check(make_zip(make_elf(), host=b"{nope")), "not JSON")
        self.assertProblem(self.check(make_zip(make_elf(), host=b"{}")), "no customHandler")
        self.assertProblem(self.check(make_zip(None)), "is not in the zip")
        absolute = HOST.replace(b'"lakeguard"', b'"/home/site/lakeguard"')
        self.assertProblem(self.check(make_zip(make_elf(), host=absolute)), "not relative")

    def test_every_function_folder_has_its_function_json(self):
        self.assertProblem(
            self.check(make_zip(make_elf(), extra={"Stray/readme.txt": b"x"})), "Stray has no function.json"
        )
        self.assertProblem(
            self.check(make_zip(make_elf(), extra={"Bad/function.json": b"{}"})), "no bindings list"
        )
        self.assertProblem(self.check(make_zip(make_elf(), functions=())), "no function folder")

    def test_the_folders_match_the_repository(self):
        with tempfile.TemporaryDirectory() as d:
            for f in ("BackupWorker", "Restore", "Reconcile"):
                os.makedirs(os.path.join(d, f))
                with open(os.path.join(d, f, "function.json"), "wb") as fh:
                    fh.write(FUNCTION)
            self.assertProblem(self.check(make_zip(make_elf()), functions_dir=d), "differ")
            good = make_zip(make_elf(), functions=("BackupWorker", "Reconcile", "Restore"))
            self.assertEqual(self.check(good, functions_dir=d), [])

    def test_the_command_line_exit_code(self):
        with tempfile.TemporaryDirectory() as d:
            bad = os.path.join(d, "bad.zip")
            with open(bad, "wb") as f:
                f.write(make_zip(make_elf(machine=40)))
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                self.assertEqual(cp.main([bad, "--functions", d]), 1)
            self.assertIn("not x86-64", err.getvalue())


@unittest.skipUnless(os.environ.get("LAKEGUARD_PACKAGE_ZIP"), "LAKEGUARD_PACKAGE_ZIP not set")
class ThePackagedApp(unittest.TestCase):
    """The zip scripts/package built, and damaged copies of it."""

    def setUp(self):
        self.path = os.environ["LAKEGUARD_PACKAGE_ZIP"]
        self.functions = os.path.join(ROOT, "functions")

    def rewrite(self, change):
        out = tempfile.NamedTemporaryFile(suffix=".zip", delete=False)
        out.close()
        self.addCleanup(os.unlink, out.name)
        with zipfile.ZipFile(self.path) as src, zipfile.ZipFile(out.name, "w") as dst:
            for info in src.infolist():
                data = src.read(info)
                info, data = change(info, data)
                dst.writestr(info, data)
        return out.name

    def test_it_passes(self):
        self.assertEqual(cp.check_zip(self.path, "2.28", self.functions), [])

    def test_a_newer_glibc_symbol_in_it_fails(self):
        def bump(info, data):
            if info.filename == "lakeguard":
                self.assertIn(b"GLIBC_2.28\0", data, "the binary needs no GLIBC_2.28 symbol to rename")
                data = data.replace(b"GLIBC_2.28\0", b"GLIBC_2.34\0", 1)
            return info, data

        problems = cp.check_zip(self.rewrite(bump), "2.28", self.functions)
        self.assertTrue(any("GLIBC_2.34" in p for p in problems), problems)

    def test_it_without_the_executable_bit_fails(self):
        def drop(info, data):
            if info.filename == "lakeguard":
                info.external_attr = 0o100644 << 16
            return info, data

        problems = cp.check_zip(self.rewrite(drop), "2.28", self.functions)
        self.assertTrue(any("not executable" in p for p in problems), problems)

    def test_it_for_another_machine_fails(self):
        def arm(info, data):
            if info.filename == "lakeguard":
                data = data[:18] + struct.pack("<H", 183) + data[20:]
            return info, data

        problems = cp.check_zip(self.rewrite(arm), "2.28", self.functions)
        self.assertTrue(any("not x86-64" in p for p in problems), problems)


if __name__ == "__main__":
    unittest.main()
