// A lesson's commands: each `sh` block gets a button that types it into the lesson terminal and one that copies
// it. The terminal takes the text from a "layercake:type" event and cancels the event when it did; one it
// cannot take it may give a reason for, in the event's detail.
const FEEDBACK_MS = 4000;
// Run types exactly what the block shows: only plain text, with no character that moves the cursor, sends a
// key of its own (a carriage return runs a line; a tab, shown as spaces, completes the word before it) or
// reorders what is displayed, nor one that shows as nothing at all.
const UNSHOWN = /[\u0000-\u0009\u000b-\u001f\u007f-\u009f\u061c\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]/;

function commandBlocks(root) {
  return [...root.querySelectorAll(".lesson-body pre > code.language-sh")].filter(
    (code) => code.childElementCount === 0 && !UNSHOWN.test(code.textContent),
  );
}

function say(status, text) {
  status.textContent = text;
  clearTimeout(status.timer);
  status.timer = setTimeout(() => (status.textContent = ""), FEEDBACK_MS);
}

function button(label, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.className = "command-button";
  element.textContent = label.split(" ")[0];
  element.setAttribute("aria-label", label);
  element.addEventListener("click", onClick);
  return element;
}

async function copy(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    return false; // no clipboard outside a secure context, or permission refused
  }
}

function addButtons(code, index) {
  const pre = code.parentElement;
  const text = code.textContent.replace(/\n+$/, "");
  pre.id ||= `command-${index + 1}`;
  const bar = document.createElement("div");
  bar.className = "command-bar";
  const status = document.createElement("span");
  status.className = "command-status";
  status.setAttribute("role", "status");
  const lines = text.split("\n").length;
  const what = lines === 1 ? "this command" : `these ${lines} lines`;
  const run = button(`Run ${what} in the terminal`, () => {
    const detail = { text: `${text}\n`, refusal: "" };
    if (!document.dispatchEvent(new CustomEvent("layercake:type", { detail, cancelable: true }))) return;
    say(status, detail.refusal || "Start the sandbox first, then press Run.");
  });
  const copying = button(`Copy ${what}`, async () => {
    say(status, (await copy(text)) ? "Copied." : "Select the text to copy it.");
  });
  for (const element of [run, copying]) element.setAttribute("aria-describedby", pre.id);
  bar.append(run, copying, status);
  pre.before(bar);
}

commandBlocks(document).forEach(addButtons);
