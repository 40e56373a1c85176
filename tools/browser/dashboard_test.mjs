// The dashboard in a real browser (Debian's Chromium, driven by
// playwright-core; no browser is downloaded). Run by
// crates/shoal/tests/dashboard_e2e.rs against a `shoal up` fleet:
//
//   DASHBOARD_URL  the URL `shoal up` printed (with its admin token)
//   CONTROL        the control plane's URL
//   GATEWAY        a gateway's URL (for traffic)
//   SHOAL_BIN      the shoal binary (CLI steps), SHOAL_TOKEN for it
//   MODELS         the bundled models' directory
//   ARTIFACTS      where screenshots go
//   CHROMIUM       the browser (default /usr/bin/chromium)
//   FIREFOX        Firefox, for the second pass (default /usr/bin/firefox-esr;
//                  driven over WebDriver BiDi)
//
// Exits non-zero, naming the step, when the page does not show what it
// should within the step's deadline.
import { execFileSync } from "node:child_process";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium, firefox } from "playwright-core";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const DASHBOARD_URL = env("DASHBOARD_URL");
const CONTROL = env("CONTROL");
const GATEWAY = env("GATEWAY");
const SHOAL_BIN = env("SHOAL_BIN");
const MODELS = env("MODELS");
const ARTIFACTS = env("ARTIFACTS");
mkdirSync(ARTIFACTS, { recursive: true });

const log = (...args) => console.log("[dashboard test]", ...args);
const shoal = (...args) => {
  log("shoal", args.join(" "));
  return execFileSync(SHOAL_BIN, [...args, "--control", CONTROL], { encoding: "utf8", env: process.env });
};
const shoalJson = (...args) => JSON.parse(shoal(...args, "--json"));

let step = "start";
const shot = async (page, name) => {
  const path = join(ARTIFACTS, `${name}.png`);
  await page.screenshot({ path, fullPage: true });
  log("screenshot", path);
};

// Inference traffic through the gateway, `clients` at a time, until stopped.
function traffic(clients) {
  let running = true;
  let ok = 0;
  let failed = 0;
  const body = JSON.stringify({
    inputs: [{ name: "input", shape: [1, 64], datatype: "FP32", data: Array.from({ length: 64 }, (_, i) => (i % 16) / 16) }],
  });
  const loops = Array.from({ length: clients }, async () => {
    while (running) {
      try {
        const r = await fetch(`${GATEWAY}/v2/models/digits/infer`, { method: "POST", headers: { "content-type": "application/json" }, body });
        await r.arrayBuffer();
        if (r.ok) ok++;
        else failed++;
      } catch {
        failed++;
      }
    }
  });
  return {
    stop: async () => {
      running = false;
      await Promise.all(loops);
      return { ok, failed };
    },
  };
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  // The machine's network is closed: no background calls to Google.
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
let load;
let page;
try {
  // 1. The URL shoal up printed signs in and shows three healthy replicas.
  step = "open the printed URL";
  const signedIn = await browser.newContext({ viewport: { width: 1366, height: 900 } });
  page = await signedIn.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => m.type() === "error" && problems.push(`console: ${m.text()}`));
  await page.goto(DASHBOARD_URL);
  if (page.url().includes("token")) throw new Error(`the token stayed in the address bar: ${page.url()}`);
  step = "three healthy replicas";
  await page.waitForFunction(() => document.querySelectorAll('[data-replica][data-healthy="true"]').length === 3, null, { timeout: 30000 });
  await page.locator("#who").filter({ hasText: "admin" }).waitFor();
  await page.locator('#models article[data-model="digits"]').waitFor();
  await shot(page, "01-fleet");

  // 2. Without a session: the sign-in form and no fleet data.
  step = "sign-in form without a token";
  const anonymous = await browser.newContext({ viewport: { width: 1366, height: 900 } });
  const stranger = await anonymous.newPage();
  await stranger.goto(`${CONTROL}/`);
  await stranger.locator("#signin").waitFor({ state: "visible" });
  if (await stranger.locator("#app").isVisible()) throw new Error("the app shows without a session");
  if ((await stranger.locator("[data-replica]").count()) !== 0) throw new Error("fleet data shown without a session");
  const status = await stranger.evaluate(async () => (await fetch("/api/v1/status")).status);
  if (status !== 401) throw new Error(`the API answered ${status} without a session`);
  await shot(stranger, "02-sign-in");
  step = "a wrong token is refused";
  await stranger.goto(`${CONTROL}/?token=not-a-token`);
  await stranger.locator("#signin-error").filter({ hasText: "not valid" }).waitFor();
  if (stranger.url().includes("token=")) throw new Error("the wrong token stayed in the address bar");
  step = "sign in from the keyboard";
  const token = env("SHOAL_TOKEN");
  await stranger.locator("#token").focus();
  await stranger.keyboard.type(token);
  await stranger.keyboard.press("Enter");
  await stranger.locator("#app").waitFor({ state: "visible" });
  await stranger.waitForFunction(() => document.querySelectorAll('[data-replica][data-healthy="true"]').length === 3);
  step = "sign out";
  await stranger.locator("#signout button").click();
  await stranger.locator("#signin").waitFor({ state: "visible" });
  await anonymous.close();

  // 3. A slow canary: the page shows it, its p99 above the baseline's,
  //    then the automatic rollback with its reason.
  step = "slow canary deployed";
  load = traffic(4);
  const slow = shoalJson("model", "push", "digits", join(MODELS, "digits-slow.onnx"));
  const slowVersion = String(slow.version);
  shoal("deploy", `digits:${slowVersion}`, "--strategy", "canary", "--steps", "50,100", "--bake", "4s", "--min-requests", "30");
  const card = page.locator('article.rollout[data-model="digits"]');
  await page.waitForFunction(
    (v) => {
      const c = document.querySelector('article.rollout[data-model="digits"]');
      return c && c.dataset.state === "progressing" && c.querySelector(".title").textContent.includes(`→ ${v}`);
    },
    slowVersion,
    { timeout: 30000 },
  );
  await shot(page, "03-canary");
  step = "automatic rollback shown with its reason";
  await page.waitForFunction(() => document.querySelector('article.rollout[data-model="digits"]')?.dataset.state === "rolled_back", null, {
    timeout: 90000,
  });
  const reason = await card.locator(".reason-text").textContent();
  if (!/p99/.test(reason)) throw new Error(`the rollback reason does not name p99: ${reason}`);
  await card.locator('.decisions li[data-action="deploy.rolled_back"]').waitFor();
  step = "the canary's p99 above the baseline's";
  // The lines' last points: the canary's last window before it lost its
  // traffic, the baseline's now (the first seconds of traffic are slow on
  // every version while connections open, so peaks say little).
  await page.waitForFunction(
    (v) => {
      const chart = document.querySelector('article.rollout[data-model="digits"] [data-chart="p99"]');
      const last = (version) => Number(chart?.querySelector(`path[data-version="${version}"]`)?.dataset.last || "NaN");
      return last(v) > last("1");
    },
    slowVersion,
    { timeout: 20000 },
  );
  if ((await card.locator('[data-chart="p99"] line.decision').count()) === 0) throw new Error("no decision marked on the p99 chart");
  step = "the canary's traffic charted at its step's weight";
  const canaryWeight = await card.locator(`[data-chart="Traffic weight"] path[data-version="${slowVersion}"]`).getAttribute("data-max");
  if (canaryWeight !== "50") throw new Error(`the canary's weight peaked at ${canaryWeight} %, not its step's 50 %`);
  await card.scrollIntoViewIfNeeded();
  await shot(page, "04-rolled-back");
  await card.screenshot({ path: join(ARTIFACTS, "04-rolled-back-card.png") });
  const counts = await load.stop();
  load = undefined;
  log("traffic during the canary:", counts);

  // 4. A second rollout, aborted by clicking; the API agrees.
  step = "second rollout progressing";
  const good = shoalJson("model", "push", "digits", join(MODELS, "digits-v2.onnx"));
  const goodVersion = String(good.version);
  shoal("deploy", `digits:${goodVersion}`, "--strategy", "canary", "--steps", "10,50,100", "--bake", "10m");
  await page.waitForFunction(
    (v) => {
      const c = document.querySelector('article.rollout[data-model="digits"]');
      return c && c.dataset.state === "progressing" && c.querySelector(".title").textContent.includes(`→ ${v}`);
    },
    goodVersion,
    { timeout: 30000 },
  );
  step = "abort by clicking";
  await card.locator('button[data-action="abort"]').click();
  await page.locator("#confirm").waitFor({ state: "visible" });
  await shot(page, "05-abort-confirm");
  await page.locator("#confirm-ok").click();
  await page.waitForFunction(() => document.querySelector('article.rollout[data-model="digits"]')?.dataset.state === "aborted", null, {
    timeout: 30000,
  });
  const rollout = shoalJson("rollout", "status", "digits");
  if (rollout.state !== "aborted") throw new Error(`the API says ${JSON.stringify(rollout)}`);
  await page.locator("#audit-filter").fill("aborted");
  await page.locator("#audit-rows tr").first().waitFor();
  const actor = await page.locator("#audit-rows tr").first().locator("td").nth(1).textContent();
  if (actor !== "admin") throw new Error(`the abort was recorded as ${actor}`);
  await card.scrollIntoViewIfNeeded();
  await shot(page, "06-aborted");

  // 5. A viewer sees the same rollout and no button to change it.
  step = "a viewer sees no actions";
  const viewerToken = shoalJson("token", "create", "--name", "dashboard-viewer", "--role", "viewer").token;
  const viewing = await browser.newContext({ viewport: { width: 1366, height: 900 } });
  const viewer = await viewing.newPage();
  await viewer.goto(`${CONTROL}/?token=${viewerToken}`);
  await viewer.locator("#who").filter({ hasText: "viewer" }).waitFor();
  await viewer.locator('article.rollout[data-model="digits"]').waitFor();
  await viewer.locator('#models article[data-model="digits"]').waitFor();
  const buttons = await viewer.locator("button[data-action]").count();
  if (buttons !== 0) throw new Error(`a viewer is offered ${buttons} action buttons`);
  await shot(viewer, "07-viewer");
  await viewing.close();

  // 6. One event stream per open page, none left behind by closed ones,
  //    and a page that does not grow as updates arrive.
  step = "no stream left behind";
  const streams = async () => {
    const text = await (await fetch(`${CONTROL}/metrics`)).text();
    const line = text.split("\n").find((l) => l.startsWith("shoal_dashboard_streams "));
    return Number(line?.split(" ")[1]);
  };
  const deadline = Date.now() + 15000;
  while ((await streams()) !== 1) {
    if (Date.now() > deadline) throw new Error(`${await streams()} dashboard streams open with one page left`);
    await new Promise((r) => setTimeout(r, 200));
  }
  step = "the page does not grow";
  const snapshots = () => page.evaluate(() => Number(document.body.dataset.snapshots || 0));
  const nodes = () => page.evaluate(() => document.getElementsByTagName("*").length);
  const first = await snapshots();
  const before = await nodes();
  await page.waitForFunction((n) => Number(document.body.dataset.snapshots) >= n + 5, first, { timeout: 20000 });
  const after = await nodes();
  if (after !== before) throw new Error(`the page went from ${before} to ${after} elements over 5 updates`);
  if (problems.length) throw new Error(problems.join("\n"));

  // 7. The same page in Firefox: signed in through the printed URL, the
  //    fleet, the rollout with its charts and decisions, the registry; the
  //    sign-in form without a session.
  step = "Firefox";
  const fox = await firefox.launch({
    executablePath: process.env.FIREFOX || "/usr/bin/firefox-esr",
    channel: "moz-firefox",
    headless: true,
  });
  try {
    const foxPage = await fox.newPage({ viewport: { width: 1366, height: 900 } });
    const foxProblems = [];
    // Playwright's BiDi client inserts a <style> of its own, which the
    // page's policy (no inline style) refuses and Firefox reports as a page
    // error; the page itself has none (Chromium, over CDP, reports nothing).
    const harness = (m) => m.includes("blocked an inline style (style-src-elem)");
    foxPage.on("pageerror", (e) => harness(e.message) || foxProblems.push(`page error: ${e.message}`));
    await foxPage.goto(DASHBOARD_URL);
    if (foxPage.url().includes("token")) throw new Error(`Firefox kept the token in the address bar: ${foxPage.url()}`);
    await foxPage.waitForFunction(() => document.querySelectorAll('[data-replica][data-healthy="true"]').length === 3, null, { timeout: 30000 });
    const foxCard = foxPage.locator('article.rollout[data-model="digits"]');
    await foxCard.waitFor();
    if ((await foxCard.getAttribute("data-state")) !== "aborted") throw new Error("Firefox shows another rollout state");
    await foxPage.waitForFunction(
      () => document.querySelectorAll('article.rollout[data-model="digits"] [data-chart="p99"] path[data-version]').length > 0,
      null,
      { timeout: 20000 },
    );
    await foxCard.locator('.decisions li[data-action="deploy.aborted"]').waitFor();
    await foxPage.locator('#models article[data-model="digits"] tr[data-version="1"]').waitFor();
    await foxCard.scrollIntoViewIfNeeded();
    await foxPage.screenshot({ path: join(ARTIFACTS, "08-firefox.png"), fullPage: true });
    const foxStranger = await fox.newPage();
    await foxStranger.goto(`${CONTROL}/`);
    await foxStranger.locator("#signin").waitFor({ state: "visible" });
    if ((await foxStranger.locator("[data-replica]").count()) !== 0) throw new Error("Firefox shows fleet data without a session");
    if (foxProblems.length) throw new Error(foxProblems.join("\n"));
  } finally {
    await fox.close();
  }
  log("all steps passed");
} catch (e) {
  console.error(`[dashboard test] FAILED at step "${step}": ${e.stack || e}`);
  process.exitCode = 1;
  if (page) await shot(page, "failed").catch(() => {});
} finally {
  if (load) await load.stop();
  await browser.close();
}
