// A lesson's commands: each `sh` block gets a button that types it into the lesson terminal and one that copies
// it. The terminal takes the text from a "layercake:type" event and cancels the event when it did; an event
// left alone means there is no terminal ready to take it.
const FEEDBACK_MS = 2000;

function commandBlocks(root) {
  return [...root.querySelectorAll(".lesson-body pre > code.language-sh")];
}

function say(status, text) {
  status.textContent = text;
  clearTimeout(status.timer);
  status.timer = setTimeout(() => (status.textContent = ""), FEEDBACK_MS);
}

function button(label, description, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.className = "command-button";
  element.textContent = label;
  element.setAttribute("aria-label", description);
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

function addButtons(code) {
  const pre = code.parentElement;
  const text = code.textContent.replace(/\n+$/, "");
  const bar = document.createElement("div");
  bar.className = "command-bar";
  const status = document.createElement("span");
  status.className = "command-status";
  status.setAttribute("role", "status");
  const lines = text.split("\n").length;
  const what = lines === 1 ? "this command" : `these ${lines} lines`;
  bar.append(
    button("Run", `Type ${what} into the terminal`, () => {
      const event = new CustomEvent("layercake:type", { detail: { text: `${text}\n` }, cancelable: true });
      if (!document.dispatchEvent(event)) return;
      const terminal = document.querySelector("[data-terminal]");
      say(status, terminal ? "The terminal is not connected just now: try again in a moment." : "Start the sandbox first, then press Run.");
    }),
    button("Copy", `Copy ${what}`, async () => {
      say(status, (await copy(text)) ? "Copied." : "Select the text to copy it.");
    }),
    status,
  );
  pre.classList.add("command");
  pre.before(bar);
}

for (const code of commandBlocks(document)) addButtons(code);
