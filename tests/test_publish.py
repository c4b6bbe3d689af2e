"""Publishing and opening the book: the GitHub workflows, `make publish`, the repository settings in
_config.yml, the Binder preparation of the chapters, `make lab`, papermill on one chapter, and the
about page (citation, licences). The built site's buttons and links are checked in test_site.py.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from icl_core import book
from icl_core.config import DataConfig
from icl_core.profiles import load_profile

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
BIN = Path(sys.executable).parent
# `make -o <stamp>`: never reinstall the environment from a test (make test has just set it up)
MAKE = ["make", "--no-print-directory", "-C", str(ROOT), "-o", ".venv/.installed"]
PINNED = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@(v\d+\.\d+\.\d+|[0-9a-f]{40})$")


def _workflow(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def _steps(wf: dict):
    for job in wf["jobs"].values():
        yield from job.get("steps", [])


def _schema_check(*files) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows",
                           *map(str, files)], capture_output=True, text=True)


# --- the workflows ---------------------------------------------------------------------------

def test_workflows_pass_the_schema_check():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"book.yml", "test.yml"}
    r = _schema_check(*files)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("breakage", ["no runs-on", "misspelled uses", "unknown trigger"])
def test_schema_check_rejects_a_broken_workflow(tmp_path, breakage):
    wf = _workflow("book.yml")
    if breakage == "no runs-on":
        del wf["jobs"]["build"]["runs-on"]
    elif breakage == "misspelled uses":
        step = wf["jobs"]["deploy"]["steps"][0]
        step["use"] = step.pop("uses")
    else:
        wf["on"] = {"pushed": {"branches": ["main"]}}
    bad = tmp_path / "book.yml"
    bad.write_text(yaml.safe_dump(wf, sort_keys=False))
    assert _schema_check(bad).returncode != 0


def test_every_action_is_pinned_by_version():
    uses = [s["uses"] for f in sorted(WORKFLOWS.glob("*.yml")) for s in _steps(_workflow(f.name)) if "uses" in s]
    assert uses
    assert [u for u in uses if not PINNED.match(u)] == []


def test_book_workflow_builds_the_laptop_book_and_deploys_it_to_pages():
    wf = _workflow("book.yml")
    on = wf[True] if True in wf else wf["on"]  # YAML 1.1 reads the key `on` as True
    assert on["push"]["branches"] == ["main"]
    build, deploy = wf["jobs"]["build"], wf["jobs"]["deploy"]
    assert build["env"]["PROFILE"] == "laptop"
    runs = [s.get("run", "") for s in build["steps"]]
    assert any('make book PROFILE="$PROFILE"' in r for r in runs)
    by_action = {s["uses"].split("@")[0]: s for s in _steps(wf) if "uses" in s}
    assert by_action["actions/upload-pages-artifact"]["with"]["path"] == "_build/html"
    assert "actions/deploy-pages" in by_action and deploy["needs"] == "build"
    assert wf["permissions"]["pages"] == "write" and wf["permissions"]["id-token"] == "write"
    cache = by_action["actions/cache"]["with"]
    assert cache["path"] == "runs" and build["env"]["ICL_RUNS_DIR"].endswith("/runs")
    assert "steps.runs-key.outputs.key" in cache["key"] and "env.PROFILE" in cache["key"]
    # the cache is restored before anything trains
    names = [s.get("uses", s.get("run", "")) for s in build["steps"]]
    assert names.index(by_action["actions/cache"]["uses"]) < next(i for i, n in enumerate(names) if "make book" in n)


def _runs_key(tmp_path, profile: str) -> str:
    step = next(s for s in _steps(_workflow("book.yml")) if s.get("id") == "runs-key")
    script = step["run"].replace(".venv/bin/python", sys.executable)
    out = tmp_path / f"github_output_{profile}"
    out.unlink(missing_ok=True)  # GitHub gives each step a new, empty file
    env = dict(os.environ, PROFILE=profile, GITHUB_OUTPUT=str(out),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    subprocess.run(["bash", "-e", "-c", script], cwd=ROOT, env=env, check=True)
    (line,) = out.read_text().splitlines()
    assert line.startswith("key=")
    return line[len("key="):]


def test_runs_cache_key_is_the_hash_of_the_profiles_run_hashes(tmp_path):
    """The workflow's own step, run here: its key changes exactly when a run configuration does."""
    for name in ("laptop", "smoke"):
        hashes = sorted(c.hash() for c in load_profile(name).runs.values())
        assert _runs_key(tmp_path, name) == hashlib.sha256(" ".join(hashes).encode()).hexdigest()
    assert _runs_key(tmp_path, "laptop") != _runs_key(tmp_path, "smoke")


def test_expressions_name_existing_steps_and_jobs():
    """What a schema cannot see: `steps.<id>` and `needs.<job>` in an expression name a step of the
    same job that comes before, and a job this one needs."""
    for f in sorted(WORKFLOWS.glob("*.yml")):
        wf = _workflow(f.name)
        for job_id, job in wf["jobs"].items():
            needs = job.get("needs", [])
            needs = [needs] if isinstance(needs, str) else needs
            assert set(needs) <= set(wf["jobs"]) - {job_id}, (f.name, job_id, needs)
            seen: list[str] = []
            for step in job.get("steps", []):
                text = yaml.safe_dump(step)
                for ref in re.findall(r"steps\.([\w-]+)\.", text):
                    assert ref in seen or (ref == step.get("id") and "outputs" not in text), (f.name, job_id, ref)
                for ref in re.findall(r"needs\.([\w-]+)\.", text):
                    assert ref in needs, (f.name, job_id, ref)
                if "id" in step:
                    seen.append(step["id"])
            # an environment's url may name a step of the job
            for ref in re.findall(r"steps\.([\w-]+)\.", yaml.safe_dump(job.get("environment", ""))):
                assert ref in seen, (f.name, job_id, ref)


def test_test_workflow_runs_make_test_on_pushes_and_pull_requests():
    wf = _workflow("test.yml")
    on = wf[True] if True in wf else wf["on"]
    assert "push" in on and "pull_request" in on
    runs = [s.get("run", "") for s in _steps(wf)]
    assert any(r.strip() == "bash .ci/run" for r in runs)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


# --- make publish ----------------------------------------------------------------------------

def _git(*args, cwd=None, env=None):
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def publish_to_bare_remote(site: Path, tmp: Path) -> set[str]:
    """`make publish` of ``site`` from a scratch repository whose `origin` is a local bare repository;
    returns the files of the remote's gh-pages branch."""
    remote, repo = tmp / "remote.git", tmp / "repo"
    _git("init", "-q", "--bare", str(remote))
    _git("init", "-q", str(repo))
    _git("remote", "add", "origin", str(remote), cwd=repo)
    env = dict(os.environ, GIT_DIR=str(repo / ".git"), GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.org")
    r = subprocess.run([*MAKE, "publish", f"SITE={site}", "PUBLISH_REMOTE=origin"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (repo / ".git" / "refs" / "heads").exists()
    return set(_git("ls-tree", "-r", "--name-only", "gh-pages", cwd=remote).split())


def test_make_publish_pushes_the_site_and_nothing_else(tmp_path):
    build = tmp_path / "_build"
    site = build / "html"
    pages = {"index.html": "<html>index</html>", "chapters/00_intro.html": "<html>intro</html>",
             "_static/site.css": "body {}", "_sources/chapters/00_intro.ipynb": "{}"}
    for rel, text in pages.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    executed = build / "executed" / "smoke"
    executed.mkdir(parents=True)
    (executed / "00_intro.ipynb").write_text("{}")
    (executed / "00_intro.key.json").write_text("{}")
    files = publish_to_bare_remote(site, tmp_path)
    assert files == set(pages) | {".nojekyll"}


def test_make_publish_refuses_without_a_built_site(tmp_path):
    r = subprocess.run([*MAKE, "publish", f"SITE={tmp_path / 'nothing'}"], capture_output=True, text=True)
    assert r.returncode != 0 and "make book" in r.stdout + r.stderr


# --- the repository settings: one place --------------------------------------------------------

def test_repository_url_and_branch_are_set_in_one_place():
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    repo = cfg["repository"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repo["url"]) and repo["branch"]
    # the about page's substitutions are YAML aliases of the same values
    subs = cfg["parse"]["myst_substitutions"]
    assert (subs["repository_url"], subs["repository_branch"]) == (repo["url"], repo["branch"])
    assert "*repository_url" in (ROOT / "_config.yml").read_text()
    html = cfg["html"]
    assert html["use_repository_button"] and html["use_issues_button"]
    launch = cfg["launch_buttons"]
    assert launch["binderhub_url"].startswith("https://") and launch["colab_url"].startswith("https://")
    # no other tracked file writes the URL (the README names the placeholder it tells the owner to replace)
    tracked = _git("ls-files", cwd=ROOT).split()
    holders = [f for f in tracked if (ROOT / f).is_file() and f not in ("_config.yml", "README.md")
               and repo["url"] in (ROOT / f).read_text(errors="ignore")]
    assert holders == []
    readme = (ROOT / "README.md").read_text()
    assert "_config.yml" in readme and "repository:" in readme


# --- Binder: the chapters with the smoke profile, training their runs first --------------------

def test_binder_prepares_every_chapter_for_smoke_and_trains_its_runs_first(tmp_path):
    post_build = ROOT / "binder" / "postBuild"
    assert os.access(post_build, os.X_OK)
    lines = [ln for ln in post_build.read_text().splitlines() if ln and not ln.startswith("#")]
    assert any(ln.startswith("pip install") and ln.endswith("-r requirements.txt") for ln in lines)
    assert lines[-1] == "python binder/prepare_chapters.py --profile smoke chapters"
    chapters = tmp_path / "chapters"
    shutil.copytree(ROOT / "chapters", chapters, ignore=shutil.ignore_patterns("*.md"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               ICL_RUNS_DIR=str(tmp_path / "runs"))
    subprocess.run([sys.executable, str(ROOT / "binder" / "prepare_chapters.py"), str(chapters)], env=env, check=True)
    smoke = load_profile("smoke")
    for nb_path in sorted(chapters.glob("*.ipynb")):
        cells = json.loads(nb_path.read_text())["cells"]
        tags = [c["metadata"].get("tags", []) for c in cells]
        i = next(i for i, t in enumerate(tags) if "injected-parameters" in t)
        assert "parameters" in tags[i - 1] and "train-runs-first" in tags[i + 1], nb_path.name
        ns: dict = {}
        exec("".join(cells[i]["source"]), ns)
        ns.pop("__builtins__")
        assert ns == book.chapter_parameters(smoke, nb_path.stem)
        assert not any(c.get("outputs") for c in cells)
    # a prepared chapter runs as it is, training its (missing) runs first
    out = tmp_path / "out.ipynb"
    r = subprocess.run([str(BIN / "papermill"), str(chapters / "00_intro.ipynb"), str(out), "--cwd", str(chapters)],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in smoke.chapter_params("00_intro")["runs"]:
        assert smoke.run(name, root=tmp_path / "runs").done
    assert "smoke" in json.dumps(json.loads(out.read_text())["cells"][:6])


# --- opening a chapter locally -----------------------------------------------------------------

def _readme_papermill_command() -> list[str]:
    lines = [ln.split("#")[0].split() for ln in (ROOT / "README.md").read_text().splitlines()]
    cmds = [ln for ln in lines if ln and ln[0].endswith("papermill")]
    assert cmds, "the README shows no papermill command"
    return cmds[0]


def test_readme_papermill_command_executes_a_chapter_with_the_smoke_profile(tmp_path):
    """The README's command, run on the cheapest chapter (the methods appendix trains nothing)."""
    cmd = _readme_papermill_command()
    assert re.fullmatch(r"chapters/\w+\.ipynb", cmd[1]) and cmd[3:] == ["-p", "profile", "smoke"]
    out = tmp_path / "methods.ipynb"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([str(BIN / "papermill"), "chapters/07_methods.ipynb", str(out), *cmd[3:]],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cells = json.loads(out.read_text())["cells"]
    injected = next(c for c in cells if "injected-parameters" in c["metadata"].get("tags", []))
    assert 'profile = "smoke"' in "".join(injected["source"])
    outputs = [o for c in cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert "**smoke** profile" in json.dumps(outputs)  # the chapter's banner


def test_make_lab_installs_pinned_jupyterlab_and_opens_the_chapters():
    pins = [ln for ln in (ROOT / "requirements-lab.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert pins and all(re.fullmatch(r"[\w.-]+==[\w.]+", p) for p in pins)
    assert any(p.startswith("jupyterlab==") for p in pins)
    r = subprocess.run([*MAKE, "-n", "-W", "requirements-lab.txt", "lab"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any("pip install -q -r requirements-lab.txt" in ln for ln in lines)
    assert lines[-1].split()[:3] == [".venv/bin/jupyter", "lab", "--notebook-dir=chapters"]
    # the project's kernel, which every chapter names, is this environment's python
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")  # installed by `make setup` (ipykernel --sys-prefix)
    assert Path(spec.resource_dir).resolve() == (Path(sys.prefix) / "share/jupyter/kernels/python3").resolve()
    assert Path(spec.argv[0]).parent.resolve() == Path(sys.executable).parent.resolve()
    for nb in (ROOT / "chapters").glob("*.ipynb"):
        assert json.loads(nb.read_text())["metadata"]["kernelspec"]["name"] == "python3", nb.name


# --- about this reproduction -------------------------------------------------------------------

def _declared_licence(dist: str) -> str:
    m = md.metadata(dist)
    return m.get("License-Expression") or m.get("License") or " ".join(
        c.split(" :: ")[-1] for c in m.get_all("Classifier") or [] if c.startswith("License ::"))


def test_about_page_names_the_licence_of_every_corpus_package():
    about = (ROOT / "chapters" / "about.md").read_text()
    rows = {m.group(1): line for line in about.splitlines() if (m := re.search(r"\| `([\w-]+)` \|", line))}
    d = DataConfig()
    corpus = [f"pythonbible-{v}" for v in d.bible_versions] + list(d.code_packages)
    for dist in corpus:
        assert dist in rows, f"about.md has no licence row for {dist}"
        declared = _declared_licence(dist)
        family = re.match(r"[A-Za-z]+", declared).group(0)  # MIT, BSD, ...
        assert family in rows[dist], (dist, declared, rows[dist])
    assert "07_methods.ipynb#deviations-from-the-paper" in about
    # the code's row follows the repository: a licence file, once added, must be named there
    code_row = next(line for line in about.splitlines() if line.startswith("| the book's code"))
    licence_files = sorted(p.name for p in ROOT.iterdir() if p.name.upper().startswith(("LICENSE", "LICENCE", "COPYING")))
    if licence_files:
        assert any(name in code_row for name in licence_files), code_row
    else:
        assert "no licence file" in code_row, code_row


def test_citations():
    r = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.citation-file-format",
                        str(ROOT / "CITATION.cff")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    (paper,) = cff["references"]
    cff_authors = [f"{a['family-names']}, {a['given-names']}" for a in paper["authors"]]
    about = (ROOT / "chapters" / "about.md").read_text()
    bib = re.search(r"```bibtex\n(.*?)```", about, re.S).group(1)
    bib_authors = re.search(r"author=\{(.*?)\}", bib).group(1).split(" and ")
    assert bib_authors == cff_authors and len(cff_authors) > 20
    assert f"title={{{paper['title']}}}" in bib and f"year={{{paper['year']}}}" in bib
