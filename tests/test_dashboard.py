"""`python -m planbus dashboard` in a real browser (chromium): live, acting, and refusing."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import pytest

from planbus.ops.actions import CANCELLED_ERROR
from tests.browser import chromium, running_dashboard
from tests.helpers import Database, wait_until

pytestmark = pytest.mark.anyio

STEPS = [
    {
        "step_id": 1,
        "action_type": "linkedin_like",
        "description": "Like their three most recent posts",
        "suggested_text": None,
        "timing": "Day 0",
        "delay_days": 0,
        "status": "pending",
        "completed_at": None,
    },
    {
        "step_id": 2,
        "action_type": "linkedin_comment",
        "description": "Comment on the <b>launch</b> post <img src=x onerror=alert(1)>",
        "suggested_text": None,
        "timing": "Day 2",
        "delay_days": 2,
        "status": "pending",
        "completed_at": None,
    },
]


async def claim(database: Database, request_id: int) -> None:
    """The request as a worker holds it while the model writes (what bus/claim.py sets)."""
    await database.conn.execute(
        "UPDATE plan_requests SET status = 'processing', attempts = 1, claim_token = "
        "gen_random_uuid(), worker_id = 'host-a:1234', claimed_at = now(), "
        "lease_expires_at = now() + interval '1 minute' WHERE id = %s",
        (request_id,),
    )


async def write_progress(database: Database, request_id: int, steps: list[dict[str, Any]]) -> None:
    """What bus/progress.py writes as each step is finished."""
    progress = {"started_at": "2026-12-07T00:00:00+00:00", "steps": steps}
    await database.conn.execute(
        "UPDATE plan_requests SET progress = %s WHERE id = %s", (json.dumps(progress), request_id)
    )


async def fail(database: Database, request_id: int, error: str) -> None:
    await database.conn.execute(
        "UPDATE plan_requests SET status = 'failed', attempts = 3, finished_at = now(), "
        "result = jsonb_build_object('error', %s::text), last_error = %s WHERE id = %s",
        (error, error, request_id),
    )


async def appears(page: Any, selector: str, text: str, within: float = 2.0) -> float:
    """Seconds until `text` shows in `selector` on the page as it is (no reload)."""
    started = time.monotonic()
    await page.locator(selector, has_text=text).first.wait_for(timeout=within * 1000)
    return time.monotonic() - started


async def test_a_step_the_model_writes_appears_on_the_page_within_2_s(database: Database) -> None:
    lead = await database.insert_lead(prospect_name="Grace <i>Hopper</i>")
    request_id = await database.insert_request(lead)
    await claim(database, request_id)
    async with running_dashboard(database.url) as dashboard, chromium() as browser:
        page = await browser.new_page()
        await page.goto(dashboard.url)
        assert "planbus" in await page.title()
        planned = f"article.planning[data-request-id='{request_id}']"
        await appears(page, planned, "waiting for the model's first step")
        await page.evaluate("window.notReloaded = true")

        await write_progress(database, request_id, STEPS[:1])
        first = await appears(page, f"{planned} li.step", "Like their three most recent posts")
        await write_progress(database, request_id, STEPS)
        second = await appears(page, f"{planned} li.step", "Comment on the <b>launch</b> post")

        assert first < 2.0 and second < 2.0, (first, second)
        assert await page.evaluate("window.notReloaded") is True
        # What the model and the database say is shown as text, never as markup.
        assert await page.locator("#planning img, #planning b, #requests i").count() == 0
        assert "Grace <i>Hopper</i>" in await page.locator("#planning").inner_text()
        assert await page.locator("#counts [data-status='processing'] .number").inner_text() == "1"


async def test_retry_and_cancel_buttons_do_what_the_commands_do(database: Database) -> None:
    failed = await database.insert_request(await database.insert_lead())
    await fail(database, failed, "The model's output was not a valid plan.")
    pending = await database.insert_request(await database.insert_lead())
    async with running_dashboard(database.url) as dashboard, chromium() as browser:
        page = await browser.new_page()
        await page.goto(dashboard.url)
        failed_row = page.locator(f"#requests tr[data-request-id='{failed}']")
        pending_row = page.locator(f"#requests tr[data-request-id='{pending}']")
        assert "not a valid plan" in await failed_row.inner_text()

        await failed_row.get_by_role("button", name="Retry").click()
        row = await database.wait_for(failed, ("pending",), within=5)
        assert row["attempts"] == 0
        assert row["last_error"] == "The model's output was not a valid plan."
        await page.get_by_text(f"request {failed} (lead").wait_for(timeout=5000)
        # The page follows: the retried request is pending now, so it offers Cancel.
        await failed_row.get_by_role("button", name="Cancel").wait_for(timeout=2000)

        await pending_row.get_by_role("button", name="Cancel").click()
        row = await database.wait_for(pending, ("failed",), within=5)
        assert row["result"]["error"] == CANCELLED_ERROR
        await pending_row.get_by_role("button", name="Retry").wait_for(timeout=2000)


async def test_an_action_that_no_longer_applies_says_why(database: Database) -> None:
    pending = await database.insert_request(await database.insert_lead())
    async with running_dashboard(database.url) as dashboard, chromium() as browser:
        page = await browser.new_page()
        # A page that has not heard of the claim yet: its stream is cut (the page still shows
        # Cancel when the worker takes the request, as between two updates).
        await page.route("**/events", lambda route: route.abort())
        await page.goto(dashboard.url)
        await claim(database, pending)  # a worker took it while the page showed Cancel
        await (
            page.locator(f"tr[data-request-id='{pending}']")
            .get_by_role("button", name="Cancel")
            .click()
        )
        notice = page.locator("#notice")
        await notice.get_by_text("it is processing; only pending requests are cancelled").wait_for(
            timeout=5000
        )
        assert (await database.request(pending))["status"] == "processing"


async def test_a_cross_site_post_is_refused(database: Database) -> None:
    pending = await database.insert_request(await database.insert_lead())
    async with running_dashboard(database.url) as dashboard, chromium() as browser:
        page = await browser.new_page()
        await page.goto(dashboard.url)
        csrf = await page.locator("#requests input[name=csrf]").first.get_attribute("value")
        action = f"{dashboard.url}requests/{pending}/cancel"

        # Another site's page posts the form, even with the right CSRF token.
        evil = await browser.new_page()
        form = (
            f"<form method=post action='{action}'><input name=csrf value='{csrf}'></form>"
            "<script>document.forms[0].submit()</script>"
        )
        await evil.route(
            "http://evil.test/",
            lambda route: route.fulfill(status=200, content_type="text/html", body=form),
        )
        async with evil.expect_response(action) as answer:
            await evil.goto("http://evil.test/")
        assert (await answer.value).status == 403
        assert "cross-site request refused" in await evil.content()

        # The same POST from the dashboard's own page would pass: the origin decided.
        api = page.context.request
        for headers in ({"Origin": "http://evil.test"}, {"Sec-Fetch-Site": "same-site"}):
            refused = await api.post(action, form={"csrf": str(csrf)}, headers=headers)
            assert refused.status == 403
        no_token = await api.post(action, form={"csrf": "guessed"})
        assert no_token.status == 403
        assert (await database.request(pending))["status"] == "pending"


async def test_with_a_token_every_page_stream_and_action_needs_it(database: Database) -> None:
    pending = await database.insert_request(await database.insert_lead())
    token = "correct horse battery staple"
    overrides = {"dashboard_token": token, "dashboard_host": "0.0.0.0"}
    async with running_dashboard(database.url, **overrides) as dashboard, chromium() as browser:
        url = dashboard.url.replace("0.0.0.0", "127.0.0.1")
        context = await browser.new_context()
        page = await context.new_page()
        for path in ("", "events", "static/dashboard.js", "?token=wrong"):
            assert (await page.goto(url + path)).status == 401, path
        action = await context.request.post(f"{url}requests/{pending}/cancel")
        assert action.status == 401

        answer = await page.goto(f"{url}?token=correct%20horse%20battery%20staple")
        assert answer.status == 200
        await page.wait_for_url(url)  # the token leaves the address bar and the history
        [cookie] = await context.cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert token not in cookie["value"]
        # The cookie carries the live stream: a new request shows without a reload.
        later = await database.insert_request(await database.insert_lead())
        await page.locator(f"#requests tr[data-request-id='{later}']").wait_for(timeout=2000)
        await (
            page.locator(f"tr[data-request-id='{pending}']")
            .get_by_role("button", name="Cancel")
            .click()
        )
        await database.wait_for(pending, ("failed",), within=5)

        bearer = await browser.new_context(extra_http_headers={"Authorization": f"Bearer {token}"})
        assert (await (await bearer.new_page()).goto(url)).status == 200


@pytest.mark.parametrize("token", [None, ""])  # an empty token is no token
async def test_on_loopback_another_host_name_is_refused(
    database: Database, token: str | None
) -> None:
    async with (
        running_dashboard(database.url, dashboard_token=token) as dashboard,
        chromium() as browser,
    ):
        context = await browser.new_context()
        for host, status in (("localhost", 200), ("evil.test", 403)):
            answer = await context.request.get(dashboard.url, headers={"Host": host})
            assert answer.status == status, host


async def test_the_page_shows_the_provider_workers_and_the_last_hour(database: Database) -> None:
    lead = await database.insert_lead()
    done = await database.insert_request(lead)
    await database.conn.execute(
        "UPDATE plan_requests SET status = 'completed', finished_at = now(), result = "
        """'{"plan": [], "step_count": 0, "model": "gpt-test",
             "usage": {"prompt_tokens": 120, "completion_tokens": 80}}' WHERE id = %s""",
        (done,),
    )
    failed = await database.insert_request(await database.insert_lead())
    await fail(database, failed, "The LLM credentials were refused.")
    await database.conn.execute(
        "INSERT INTO planbus_workers (worker_id, inflight, concurrency, llm_limit, held_back) "
        "VALUES ('host-a:1', 3, 32, 4, 'the provider asked to wait 12 s'), "
        "('host-b:2', 0, 32, 2, NULL), ('gone:3', 0, 32, 9, NULL)"
    )
    await database.conn.execute(
        "UPDATE planbus_workers SET heartbeat_at = now() - interval '5 minutes' "
        "WHERE worker_id = 'gone:3'"
    )
    await database.conn.execute(
        "UPDATE planbus_provider_limits SET paused_until = now() + interval '30 seconds'"
    )
    async with running_dashboard(database.url) as dashboard, chromium() as browser:
        page = await browser.new_page()
        await page.goto(dashboard.url)
        provider = await page.locator("#provider").inner_text()
        assert "paused for" in provider
        assert "the provider asked to wait 12 s" in provider
        assert await page.locator("#provider .calls-at-once").inner_text() == "6"
        assert "gpt-test" in provider and "120" in provider and "80" in provider
        workers = page.locator("#workers tbody tr")
        assert await workers.count() == 2  # the one silent for five minutes is not live
        assert "3 / 32" in await workers.first.inner_text()
        await page.locator("#workers time", has_text=" s").first.wait_for(timeout=2000)
        assert await page.locator("#chart rect.completed").count() == 1
        assert await page.locator("#chart rect.failed").count() == 1
        assert "1 completed, 1 failed" in await page.locator("#chart h2").inner_text()


@pytest.mark.slow
async def test_open_pages_share_one_reading_per_refresh(database: Database) -> None:
    async with running_dashboard(database.url) as dashboard, chromium() as browser:
        context = await browser.new_context()
        pages = [await context.new_page() for _ in range(5)]
        for page in pages:
            await page.goto(dashboard.url)
        feed = dashboard.feed

        async def listening() -> int:
            return feed.listeners

        await wait_until(listening, lambda count: count == 5, 5, "5 open event streams")
        before, started = feed.readings, time.monotonic()
        await anyio.sleep(3)
        readings = feed.readings - before
        assert readings <= (time.monotonic() - started) / feed.interval + 1, readings


async def test_a_failure_stays_on_the_page_with_one_retry_while_newer_requests_come(
    database: Database,
) -> None:
    failed = await database.insert_request(await database.insert_lead())
    await fail(database, failed, "The LLM credentials were refused.")
    for _ in range(40):  # more than the page's newest requests
        await database.insert_request(await database.insert_lead())
    async with running_dashboard(database.url) as dashboard, chromium() as browser:
        page = await browser.new_page()
        await page.goto(dashboard.url)
        assert await page.locator("#requests tbody tr[data-request-id]").count() == 31
        assert "older failures" in await page.locator("#requests tr.older").inner_text()
        row = page.locator(f"#requests tr[data-request-id='{failed}']")
        await row.get_by_role("button", name="Retry").click()  # strict: exactly one such button
        await database.wait_for(failed, ("pending",), within=5)
