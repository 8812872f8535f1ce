// Small DOM helpers: building elements and formatting numbers. No framework.

/**
 * h("td", {class: "num"}, "3") builds an element. Props starting with "on" become
 * listeners; `dataset`, `hidden`, `disabled`, `value`, `checked` are set as properties;
 * the rest as attributes. Children may be strings, numbers, nodes, arrays or null.
 */
export function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(props ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(element.dataset, value);
    else if (["hidden", "disabled", "value", "checked", "selected"].includes(name)) element[name] = value;
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(element, child);
    else element.append(child instanceof Node ? child : String(child));
  }
}

export function clear(element) {
  element.replaceChildren();
  return element;
}

/** "0.42 s", "12.3 s", "3 min 5 s"; "–" when unknown. */
export function seconds(value) {
  if (value === null || value === undefined || value < 0) return "–";
  if (value < 10) return `${value.toFixed(2)} s`;
  if (value < 120) return `${value.toFixed(1)} s`;
  return `${Math.floor(value / 60)} min ${Math.round(value % 60)} s`;
}

/** Milliseconds as "230 ms" or "1.42 s". */
export function millis(value) {
  if (value === null || value === undefined || value < 0) return "–";
  return value < 1000 ? `${Math.round(value)} ms` : seconds(value / 1000);
}

export function number(value, digits = 0) {
  if (value === null || value === undefined || value < 0 || Number.isNaN(value)) return "–";
  return value.toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

/** A clock time for today, else date and time. */
export function when(date) {
  if (!(date instanceof Date) || Number.isNaN(date.getTime())) return "–";
  const today = new Date().toDateString() === date.toDateString();
  return today ? date.toLocaleTimeString() : date.toLocaleString();
}

/** Bytes in binary units, as trio-swap writes sizes: "21.0 GiB", "512 MiB"; "–" when unknown. */
export function bytes(value) {
  if (value === null || value === undefined || value < 0 || Number.isNaN(value)) return "–";
  for (const [unit, factor] of [["TiB", 2 ** 40], ["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]]) {
    if (value >= factor) {
      const scaled = value / factor;
      return `${scaled < 100 ? scaled.toFixed(1) : Math.round(scaled)} ${unit}`;
    }
  }
  return `${Math.round(value)} B`;
}

/** A clock time with seconds ("14:03:27"), for moments within the last hour. */
export function clockTime(epochSeconds) {
  return new Date(epochSeconds * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}
