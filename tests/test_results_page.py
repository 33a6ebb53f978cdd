"""The results pages (GET /jobs/{id}, /watches/{id}) in a real browser: Playwright driving Debian's Chromium
against the real Serve app, on a real job and a real watch over volumes in a real S3-protocol server. One Ray
and one app for the module.

The job page is checked against what the job wrote to the bucket (its summary and the shards of volume
results, read here directly), not against what the page's own API routes say; the watch page against the
watch's JSON status (the API is the source the page reads).
"""

import gzip
import json
import os
import shutil

import pytest

from conftest import free_port, local_ray, make_bucket, synthesize, upload_tree
from test_serving import TOKEN, call, run_job, s3fs_for
from test_watches import wait_watch

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module. Missing: a failure in CI (.ci/run installs it), a skip
    elsewhere, saying how to install it."""
    if CHROMIUM is None:
        message = "chromium is not installed (apt-get install -y chromium); the results page needs a real browser"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        found = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield found
        finally:
            found.close()


def banded_model(folder, ct_files, low=0.3, high=0.9, seed=0):
    """A width-4 U-Net whose masks follow its images (a random one answers background or liver
    everywhere): its 1x1 head reads one random projection s of the features it sees on `ct_files`,
    background below the `low` quantile of s, tumour above the `high` one, liver between. So the
    volumes get different liver and tumour volumes and lesion counts, which the page must show."""
    import torch

    from lits.model import inference
    from lits.model.unet import UNet

    torch.manual_seed(seed)
    model = UNet(3, 3, base_width=4, depth=3)
    arch = {"name": "UNet", "in_channels": 3, "out_channels": 3, "base_width": 4, "depth": 3}
    inference.save_model(str(folder), model.state_dict(), inference.model_config(arch, "liver-tumour", 32, 0))
    spec, weights = inference.load_spec(str(folder))
    predictor = inference.Predictor(spec, weights)
    seen = []
    predictor.model.head.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().float()))
    for f in ct_files:
        inference.segment_bytes(f.read_bytes(), f.name, spec, inference.LocalModel(predictor), chunk=8)
    features = torch.cat([x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) for x in seen])
    direction = torch.randn(features.shape[1], generator=torch.Generator().manual_seed(seed))
    s = features @ direction
    q_low, q_high = torch.quantile(s, low).item(), torch.quantile(s, high).item()
    gain = 50.0 / (q_high - q_low)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.weight[0, :, 0, 0] = -gain * direction  # background: s below q_low
        model.head.bias[0] = gain * q_low
        model.head.weight[2, :, 0, 0] = gain * direction  # tumour: s above q_high
        model.head.bias[2] = -gain * q_high
    inference.save_model(str(folder), model.state_dict(), inference.model_config(arch, "liver-tumour", 32, 0))
    return str(folder)


@pytest.fixture(scope="module")
def server(tmp_path_factory, s3_server):
    """The app (token, allow-list s3://results-page) on a 3-CPU Ray, and one finished job: three phantoms of
    different sizes and one file that is not NIfTI (a failure with its reason)."""
    from ray import serve

    from lits.core import storage
    from lits.core.config import ServeConfig
    from lits.serve import serving
    from lits.serve.job_progress import read_volume_records

    root = tmp_path_factory.mktemp("page")
    ct = root / "ct"
    for i, (size, slices) in enumerate(((64, 24), (80, 28), (96, 32))):
        synthesize(ct, volumes=1, size=size, slices=slices, seed=20 + i, first_id=i)
    for f in ct.glob("segmentation-*"):
        f.unlink()
    model = banded_model(root / "model", sorted(ct.glob("volume-*")))
    (ct / "notes.nii").write_bytes(b"this is not a NIfTI file\n" * 40)
    make_bucket(s3_server, "results-page")
    upload_tree(s3_server, str(ct), "s3://results-page/ct")
    port = free_port()
    cfg = ServeConfig(model=model, port=port, allow_prefixes=("s3://results-page",),
                      batch_wait_s=0.05, chunk=8, max_batch_size=16, token_sha256=serving.token_sha256(TOKEN),
                      volume_cpus=2)
    with local_ray(3):
        try:
            serving.deploy(cfg)
            found = {"url": f"http://127.0.0.1:{port}", "endpoint": s3_server}
            job = run_job(found, input="s3://results-page/ct", output="s3://results-page/seg")
            summary = json.loads(storage.read_bytes(job["summary"]))
            found.update(job=job, summary=summary, records={r["name"]: r for r in read_volume_records(summary)})
            yield found
        finally:
            serve.shutdown()


def signed_in_page(browser, server):
    """A fresh browser context signed in by the `?token=` link; its page on the job, loaded."""
    context = browser.new_context()
    page = context.new_page()
    job_id = server["job"]["job_id"]
    page.goto(f"{server['url']}/jobs/{job_id}?token={TOKEN}")
    assert page.url == f"{server['url']}/jobs/{job_id}"  # the token left the address bar at once
    page.wait_for_selector("body[data-loaded]", timeout=30_000)
    assert page.get_attribute("body", "data-loaded") == "true", page.inner_text("#error")
    return page


def column(page, key):
    """The values of one numeric column, top to bottom (None for a blank)."""
    values = page.eval_on_selector_all(f'#volumes tbody td[data-key="{key}"]', "cells => cells.map(c => c.dataset.value)")
    return [float(v) if v != "" else None for v in values]


def test_the_page_shows_the_job_as_its_summary_says(browser, server):
    job, summary, records = server["job"], server["summary"], server["records"]
    assert job["state"] == "succeeded" and summary["counts"]["done"] == 3 and summary["counts"]["failed"] == 1, job
    page = signed_in_page(browser, server)
    try:
        assert page.inner_text("#state") == "succeeded"
        names = page.eval_on_selector_all("#volumes tbody tr", "rows => rows.map(r => r.dataset.name)")
        assert sorted(names) == sorted(records), names
        for name, record in records.items():
            row = f'#volumes tbody tr[data-name="{name}"]'
            status = page.inner_text(f'{row} td[data-key="status"]')
            if record["status"] == "failed":
                assert status == f"failed: {record['reason']}" and "not a NIfTI" in status
                assert page.locator(f"{row} button.preview").count() == 0
                continue
            assert status == "done"
            for key in ("liver_volume_ml", "tumour_volume_ml", "lesion_count", "seconds"):
                shown = page.get_attribute(f'{row} td[data-key="{key}"]', "data-value")
                assert float(shown) == pytest.approx(record[key]), (name, key, shown, record)
            burden = page.get_attribute(f'{row} td[data-key="burden"]', "data-value")
            expected = 100 * record["tumour_volume_ml"] / record["liver_volume_ml"] if record["liver_volume_ml"] else None
            assert (float(burden) if burden else None) == pytest.approx(expected), (name, burden, record)
        totals = {k: page.inner_text(f'#totals tr[data-total="{k}"] td') for k in ("total", "done", "failed")}
        assert totals == {k: str(summary["counts"][k]) for k in totals}
        done = [r for r in records.values() if r["status"] == "done"]
        assert float(page.inner_text('#totals tr[data-total="tumour_volume_ml"] td')) == pytest.approx(
            sum(r["tumour_volume_ml"] for r in done), abs=0.05)
        bars = page.eval_on_selector_all("#burden-histogram rect", "bars => bars.map(b => Number(b.dataset.count))")
        assert len(bars) == 10 and sum(bars) == sum(1 for r in done if r["liver_volume_ml"]), bars
    finally:
        page.context.close()


def test_a_preview_opens_and_the_files_are_the_buckets(browser, server):
    fs = s3fs_for(server["endpoint"])
    page = signed_in_page(browser, server)
    try:
        name = next(n for n, r in server["records"].items() if r["status"] == "done")
        row = f'#volumes tbody tr[data-name="{name}"]'
        page.click(f"{row} button.preview")
        page.wait_for_selector("#viewer[open]")
        page.wait_for_function("document.getElementById('viewer-img').complete")
        assert page.eval_on_selector("#viewer-img", "img => img.naturalWidth") > 100
        preview = page.request.get(server["url"] + page.get_attribute(f"{row} button.preview", "data-src"))
        assert preview.status == 200 and preview.headers["content-type"] == "image/png"
        assert preview.body() == fs.cat(f"results-page/seg/{name}_preview.png")
        mask = page.request.get(server["url"] + page.get_attribute(f"{row} a.mask", "href"))
        assert mask.status == 200 and mask.body() == fs.cat(f"results-page/seg/{name}_seg.nii.gz")
        assert gzip.decompress(mask.body())[:4] == (348).to_bytes(4, "little")  # a NIfTI-1 header
        report = page.request.get(server["url"] + page.get_attribute(f"{row} a.report", "href"))
        assert report.json() == json.loads(fs.cat(f"results-page/seg/{name}.json"))
        # Only the job's own volumes: another name is a 404, not a read of the bucket.
        other = page.request.get(f"{server['url']}/v1/jobs/{server['job']['job_id']}/outputs/report?name=_jobs/x")
        assert other.status == 404
    finally:
        page.context.close()


def test_sorting_a_column_orders_the_rows(browser, server):
    page = signed_in_page(browser, server)
    try:
        done = [r for r in server["records"].values() if r["status"] == "done"]
        tumour = sorted(r["tumour_volume_ml"] for r in done)
        assert len(set(tumour)) == len(tumour), tumour  # distinct values: an order to check
        page.click('th[data-key="tumour_volume_ml"]')
        assert page.get_attribute('th[data-key="tumour_volume_ml"]', "aria-sort") == "ascending"
        assert column(page, "tumour_volume_ml") == pytest.approx(tumour + [None])  # the failed row last
        page.click('th[data-key="tumour_volume_ml"]')
        assert column(page, "tumour_volume_ml") == pytest.approx(tumour[::-1] + [None])
        page.click('th[data-key="name"]')
        names = page.eval_on_selector_all("#volumes tbody tr", "rows => rows.map(r => r.dataset.name)")
        assert names == sorted(server["records"])
    finally:
        page.context.close()


def test_without_the_token_the_page_shows_a_login_and_no_data(browser, server):
    job_id = server["job"]["job_id"]
    context = browser.new_context()
    page = context.new_page()
    try:
        response = page.goto(f"{server['url']}/jobs/{job_id}")
        assert response.status == 401 and page.locator("form.login input#token").is_visible()
        assert page.locator("#volumes").count() == 0
        content = page.content()
        assert not any(name in content for name in server["records"]) and "results-page" not in content
        assert page.request.get(f"{server['url']}/v1/jobs/{job_id}/volumes").status == 401
        page.goto(f"{server['url']}/jobs/{job_id}?token=wrong")
        assert page.inner_text("#login-error") == "wrong token" and "wrong" not in page.url.split("?", 1)[0]
        assert not context.cookies()
        # The form signs in and comes back to the job; the cookie is HttpOnly and holds no token.
        page.fill("#token", TOKEN)
        page.click("#sign-in")
        page.wait_for_selector("body[data-loaded=true]", timeout=30_000)
        assert page.url == f"{server['url']}/jobs/{job_id}"
        (cookie,) = context.cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]
        assert page.evaluate("document.cookie") == ""
        # The cookie reads; it never submits, cancels or uploads (those need the Bearer header).
        assert page.request.get(f"{server['url']}/v1/jobs/{job_id}").status == 200
        posted = page.request.post(f"{server['url']}/v1/jobs", data={"input": "s3://results-page/ct", "output": "s3://results-page/x"})
        assert posted.status == 401
        assert page.request.delete(f"{server['url']}/v1/jobs/{job_id}").status == 401
        page.goto(f"{server['url']}/logout")
        assert page.goto(f"{server['url']}/jobs/{job_id}").status == 401
    finally:
        context.close()


def test_the_bearer_header_still_reads_the_volumes(server):
    """The JSON the page reads is the API's: the same records with the header, none without it."""
    job_id = server["job"]["job_id"]
    status, found, _ = call(server, "GET", f"/v1/jobs/{job_id}/volumes")
    assert status == 200 and found["complete"] and {v["name"]: v for v in found["volumes"]} == server["records"]
    assert call(server, "GET", f"/v1/jobs/{job_id}/volumes", token=None)[0] == 401


@pytest.fixture(scope="module")
def watch(server):
    """A watch over the job's input (three phantoms and the file that is not NIfTI), once it has
    segmented them all; its JSON status with every key."""
    status, created, _ = call(server, "POST", "/v1/watches", {"input": "s3://results-page/ct",
                                                               "output": "s3://results-page/watched", "poll_s": 0.5})
    assert status == 202, created
    wait_watch(server, created["watch_id"], lambda w: w["counts"]["done"] == 3 and w["counts"]["failed"] == 1,
               timeout=300)
    status, found, _ = call(server, "GET", f"/v1/watches/{created['watch_id']}?entries=500")
    assert status == 200 and len(found["entries"]) == 4, found
    return found


def test_the_watch_page_shows_what_its_status_says(browser, server, watch):
    watch_id = watch["watch_id"]
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(f"{server['url']}/watches/{watch_id}?token={TOKEN}")
        assert page.url == f"{server['url']}/watches/{watch_id}"  # the token left the address bar at once
        page.wait_for_selector("body[data-loaded=true]", timeout=30_000)
        shown = {f: page.inner_text(f'#summary tr[data-field="{f}"] td') for f in
                 ("state", "seen", "pending", "submitted", "done", "failed", "lag_p50", "lag_p95", "listing_keys",
                  "jobs_submitted")}
        counts = watch["counts"]
        assert shown == {"state": "watching", "seen": "4", **{k: str(v) for k, v in counts.items()},
                         "lag_p50": str(watch["lag_s"]["p50"]), "lag_p95": str(watch["lag_s"]["p95"]),
                         "listing_keys": str(watch["listing"]["keys"]),
                         "jobs_submitted": str(watch["jobs_submitted"])}, (shown, watch)
        assert int(page.inner_text('#summary tr[data-field="polls"] td')) >= watch["polls"]
        keys = page.eval_on_selector_all("#entries tbody tr", "rows => rows.map(r => r.dataset.key)")
        inputs = sorted(os.path.basename(r["input"]) for r in server["records"].values())
        status, recent, _ = call(server, "GET", f"/v1/watches/{watch_id}?entries=500&order=recent")
        assert status == 200 and [e["key"] for e in watch["entries"]] == inputs and len(inputs) == 4, recent
        assert keys == [e["key"] for e in recent["entries"]], (keys, recent["entries"])  # the latest to move first
        changed = [e["changed_at"] for e in recent["entries"]]
        assert changed == sorted(changed, reverse=True) and all(changed), changed
        # The keys' table sorts by a column's header, as the job's does: by key, then by lag, longest first.
        page.click('#entries th[data-key="key"]')
        assert page.eval_on_selector_all("#entries tbody tr", "rows => rows.map(r => r.dataset.key)") == inputs
        page.click('#entries th[data-key="lag_s"]')
        page.click('#entries th[data-key="lag_s"]')
        assert page.get_attribute('#entries th[data-key="lag_s"]', "aria-sort") == "descending"
        by_lag = page.eval_on_selector_all("#entries tbody tr", "rows => rows.map(r => r.dataset.key)")
        lags = {e["key"]: e["lag_s"] for e in watch["entries"]}
        assert [lags[k] for k in by_lag] == sorted(lags.values(), reverse=True), (by_lag, lags)
        for entry in watch["entries"]:
            row = f'#entries tbody tr[data-key="{entry["key"]}"]'
            assert page.inner_text(f'{row} td[data-field="state"]') == entry["state"]
            assert page.inner_text(f'{row} td[data-field="reason"]') == (entry["reason"] or "")
            assert float(page.get_attribute(f'{row} td[data-field="lag_s"]', "data-value")) == entry["lag_s"]
            assert page.get_attribute(f"{row} a.job", "href") == f"/jobs/{entry['job_id']}"
        assert "not a NIfTI" in page.inner_text('#entries tbody tr[data-key="notes.nii"] td[data-field="reason"]')
        # A key's job link opens that job's page (the same session).
        done = next(e for e in watch["entries"] if e["state"] == "done")
        page.click(f'#entries tbody tr[data-key="{done["key"]}"] a.job')
        page.wait_for_selector("body[data-loaded=true]", timeout=30_000)
        assert page.url == f"{server['url']}/jobs/{done['job_id']}" and page.inner_text("#state") == "succeeded"
    finally:
        context.close()


def test_without_the_token_the_watch_page_shows_a_login_and_no_data(browser, server, watch):
    context = browser.new_context()
    page = context.new_page()
    try:
        response = page.goto(f"{server['url']}/watches/{watch['watch_id']}")
        assert response.status == 401 and page.locator("form.login input#token").is_visible()
        content = page.content()
        assert page.locator("#entries").count() == 0 and "results-page" not in content
        assert not any(e["key"] in content for e in watch["entries"])
        assert page.request.get(f"{server['url']}/v1/watches/{watch['watch_id']}").status == 401
        page.goto(f"{server['url']}/watches/{watch['watch_id']}?token=wrong")
        assert page.inner_text("#login-error") == "wrong token" and not context.cookies()
        assert page.goto(f"{server['url']}/watches/nothex").status == 401  # no page, signed out or not, without it
    finally:
        context.close()
