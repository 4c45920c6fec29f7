// align.label keyboard shortcuts. The page works without this file (plain form controls); nothing here touches
// model output (it stays text in the DOM).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("answer");
  if (!form) return;
  const responses = Array.from(document.querySelectorAll(".response"));
  let picked = 0;
  const pick = (i) => {
    picked = Math.max(0, Math.min(i, responses.length - 1));
    responses.forEach((r, j) => r.classList.toggle("picked", j === picked));
  };
  const rankPage = document.body.classList.contains("rank");
  if (rankPage) pick(0);
  const reason = document.getElementById("reason");
  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (ev.target === reason) {  // typing a reason: Enter flags, Escape leaves the field
      if (ev.key === "Enter") { ev.preventDefault(); document.getElementById("flag").click(); }
      if (ev.key === "Escape") reason.blur();
      return;
    }
    const key = ev.key.toLowerCase();
    // Shift for skip and flag: plain letters pick responses (a response F or S must not flag or skip the item)
    if (ev.shiftKey && key === "s") { ev.preventDefault(); document.getElementById("skip").click(); return; }
    if (ev.shiftKey && key === "f") { ev.preventDefault(); reason.focus(); return; }
    if (ev.shiftKey) return;
    if (!rankPage) {
      const choice = { "1": "A", "2": "tie", "3": "B", "arrowleft": "A", "arrowdown": "tie", "arrowright": "B" }[key];
      if (choice) { ev.preventDefault(); document.getElementById("choose-" + choice).click(); }
      return;
    }
    const letter = responses.findIndex((r) => r.dataset.letter.toLowerCase() === key);
    if (letter >= 0) { ev.preventDefault(); pick(letter); return; }
    const n = parseInt(key, 10);
    if (n >= 1 && n <= responses.length) {
      ev.preventDefault();
      const radio = responses[picked].querySelector(`input[value="${n}"]`);
      radio.checked = true;
      pick(picked + 1);
      return;
    }
    if (key === "enter") { ev.preventDefault(); document.getElementById("submit").click(); }
  });
  responses.forEach((r, i) => r.addEventListener("click", () => pick(i)));
});
