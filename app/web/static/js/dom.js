// Building DOM from script: text always goes in as text, never as HTML, so nothing the API returns
// (a job name, a dataset's bad line) can inject markup.

/** h("a", {href: "#"}, "text", child): an element; text is always inserted as text, never as HTML. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false).map((c) => (c instanceof Node ? c : String(c))));
  return el;
}

function setAttrs(el, attrs) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) {
      // A handler is a function; a string here would become inline script, so it is refused.
      if (typeof value !== "function") throw new TypeError(`h(): ${name} must be a function`);
      el.addEventListener(name.slice(2), value);
    } else if (name === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(name, value === true ? "" : value);
  }
}

const SVG_NS = "http://www.w3.org/2000/svg";
export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) if (value !== null && value !== undefined) el.setAttribute(name, value);
  el.append(...children.flat().filter((c) => c !== null && c !== undefined));
  return el;
}

export function setTitle(text) { document.title = text ? `${text} · qlora-service` : "qlora-service"; }
