"""The web app in a real browser: Debian's headless Chromium driven by Selenium picks a class, generates, reads the
shown images back and checks them against the sample.py command the page offers, then edits an uploaded image with
a box, and another with a stroke drawn with the mouse on the editor's canvas, and checks that what lies outside the
region is kept and what lies inside changed (the drawn edit also against sample.py with the page's mask.png).
Saves a screenshot of each tab into $MVAR_APP_SCREENSHOTS (docs/ for the README's; default: the test's temporary
folder).

Skips, saying what is missing, without chromium + chromedriver (apt-get install chromium chromium-driver) or the
app extra (pip install -e .[app]); under CI=true, where .ci/run installs them, a missing one fails."""
import importlib.util
import io
import os
import shlex
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sample


def installed(module: str) -> bool:
    """Whether `module` is installed, without importing it (Gradio's import costs every worker's collection 3.6 s)."""
    return importlib.util.find_spec(module) is not None


MISSING = [what for ok, what in [
    (shutil.which("chromium") is not None and shutil.which("chromedriver") is not None,
     "Debian's chromium + chromium-driver (apt-get install chromium chromium-driver)"),
    (installed("selenium") and installed("gradio"), "the app extra (pip install -e .[app])")] if not ok]
if MISSING and os.environ.get("CI") != "true":
    pytest.skip(f"not installed: {'; '.join(MISSING)}", allow_module_level=True)
if not MISSING:
    from selenium import webdriver
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from test_app import app  # noqa: F401  (the app on a free loopback port over a tiny checkpoint)
else:  # CI=true: .ci/run installs them, so their absence is a failure, not a skip
    @pytest.fixture(scope="module")
    def app():
        pytest.fail(f"CI=true and not installed (.ci/run installs them): {'; '.join(MISSING)}", pytrace=False)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    yield driver
    driver.quit()


def shown(elements) -> list[np.ndarray]:
    """The pixels of the page's <img> elements, fetched from their URLs."""
    out = []
    for img in elements:
        with urllib.request.urlopen(img.get_attribute("src"), timeout=10) as r:
            out.append(np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB")))
    return out


def command_argv(driver, elem_id: str, **paths) -> list[str]:
    """The sample.py command shown in the page's code box `elem_id`, with the files it names put at `paths`."""
    line = next(t for t in driver.find_element(By.ID, elem_id).text.splitlines()
                if t.startswith("python ") and shlex.split(t)[1].endswith("sample.py"))
    argv = shlex.split(line)[2:]
    for flag, path in paths.items():
        argv[argv.index(f"--{flag}") + 1] = str(path)
    return argv


def edit_cells(grid: np.ndarray) -> list[np.ndarray]:
    """The two 8 px edits of sample.py --edit's grid (row 0: before | mask | edit | edit, 2 px padding)."""
    return [grid[2:10, 2 + k * 10:10 + k * 10] for k in (2, 3)]


def screenshot(driver, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("MVAR_APP_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(folder / name))


def test_sample_and_edit_in_the_browser(app, browser, tmp_path):  # noqa: F811
    url = app[0]
    wait = WebDriverWait(browser, 60)
    t0 = time.perf_counter()
    browser.get(url)
    wait.until(lambda d: d.find_elements(By.ID, "generate"))
    print(f"page load: {time.perf_counter() - t0:.2f} s")

    browser.find_element(By.CSS_SELECTOR, "#sample-classes input").click()  # the picker: class 3, not "random"
    wait.until(lambda d: [li for li in d.find_elements(By.CSS_SELECTOR, "#sample-classes li") if li.text == "3: three"])
    next(li for li in browser.find_elements(By.CSS_SELECTOR, "#sample-classes li") if li.text == "3: three").click()
    browser.find_element(By.CSS_SELECTOR, "#sample-classes .token .token-remove").click()
    wait.until(lambda d: [t.text for t in d.find_elements(By.CSS_SELECTOR, "#sample-classes .token")] == ["3: three"])
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: "done" in d.find_element(By.ID, "status").text)
    images = shown(browser.find_elements(By.CSS_SELECTOR, "#images img"))
    argv = command_argv(browser, "command", out=tmp_path / "cli")
    assert argv[argv.index("--classes") + 1:argv.index("--num_per_class")] == ["3"]
    cli = [np.asarray(Image.open(p)) for p in sorted(sample.main(argv).iterdir())]
    assert len(images) == len(cli) == 4 and all(np.array_equal(a, b) for a, b in zip(images, cli, strict=True))
    screenshot(browser, "app_sample.png", tmp_path)

    photo = tmp_path / "photo.png"  # 16 px: the model sees 8 px; the box is the top half
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(photo)
    browser.find_element(By.ID, "send").click()  # a generated image goes over to the editing tab
    wait.until(lambda d: "8x8 px" in d.find_element(By.ID, "size").text)
    browser.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Clear']").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(photo))
    wait.until(lambda d: "16x16 px" in d.find_element(By.ID, "size").text)
    browser.find_element(By.CSS_SELECTOR, "#box textarea, #box input").send_keys("0,0,16,8")
    browser.find_element(By.ID, "run-edit").click()
    wait.until(lambda d: "edits" in d.find_element(By.ID, "edit-status").text)
    edits = shown(browser.find_elements(By.CSS_SELECTOR, "#after img"))
    assert len(edits) == 2
    assert np.array_equal(edits[0][4:], edits[1][4:])  # outside the box: kept (the same in every edit)
    assert (edits[0][:4] != edits[1][:4]).any()  # inside: regenerated, each edit its own
    grid = np.asarray(Image.open(sample.main(command_argv(browser, "edit-command", edit=photo,
                                                          out=tmp_path / "cli.png"))))
    assert all(np.array_equal(a, b) for a, b in zip(edits, edit_cells(grid), strict=True))
    screenshot(browser, "app_edit.png", tmp_path)


def test_a_mark_drawn_with_the_mouse_edits_its_region(app, browser, tmp_path):  # noqa: F811
    """A stroke drawn with the mouse on the editing tab's canvas is the region: the edits agree outside the mask the
    page shows and differ inside it, and the offered sample.py --edit command, given the page's mask.png, gives the
    same pixels."""
    wait = WebDriverWait(browser, 60)
    browser.get(app[0])
    wait.until(lambda d: d.find_elements(By.ID, "generate"))
    next(t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text.strip() == "Edit").click()
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(photo)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(photo))
    wait.until(lambda d: "16x16 px" in d.find_element(By.ID, "size").text)
    canvas = wait.until(lambda d: [c for c in d.find_elements(By.CSS_SELECTOR, "#editor canvas") if c.size["width"]])[0]
    # the 16 px image is shown centred in the canvas at 10x (160 px): a stroke down its left part, from the centre
    ActionChains(browser).move_to_element_with_offset(canvas, -50, -60).click_and_hold() \
        .move_by_offset(0, 20).move_by_offset(0, 20).release().perform()
    browser.find_element(By.ID, "run-edit").click()
    wait.until(lambda d: "edits" in d.find_element(By.ID, "edit-status").text)
    mask = shown(browser.find_elements(By.CSS_SELECTOR, "#region img"))[0][..., 0] > 127
    edits = shown(browser.find_elements(By.CSS_SELECTOR, "#after img"))
    assert mask.any() and not mask.all(), mask.astype(int)  # the stroke, not the whole image or nothing
    assert len(edits) == 2 and np.array_equal(edits[0][~mask], edits[1][~mask])  # outside: kept
    assert (edits[0][mask] != edits[1][mask]).any()  # inside: regenerated, each edit its own
    link = next(a for a in browser.find_elements(By.CSS_SELECTOR, "#edit-files a")
                if (a.get_attribute("href") or "").endswith("mask.png"))
    mask_png = tmp_path / "mask.png"
    with urllib.request.urlopen(link.get_attribute("href"), timeout=10) as r:
        mask_png.write_bytes(r.read())
    grid = np.asarray(Image.open(sample.main(command_argv(browser, "edit-command", edit=photo, mask=mask_png,
                                                          out=tmp_path / "cli.png"))))
    assert all(np.array_equal(a, b) for a, b in zip(edits, edit_cells(grid), strict=True))
