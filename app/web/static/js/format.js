// How numbers, sizes and dates read on the page: one place, so every view shows them alike.

export const fmt = {
  date(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    return d.toLocaleString(undefined, { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  },
  time(iso) {
    return iso ? new Date(iso).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" }) : "";
  },
  bytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return `${n >= 100 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
  },
  /** Binary units, as quotas are set (storage_gib): "1.5 GiB". */
  ibytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${i === 0 ? Math.round(n) : n.toFixed(n >= 100 ? 0 : 1)} ${units[i]}`;
  },
  /** GPU-hours: two decimals below 100 ("1.50"), none from there. */
  hours(x) {
    if (x === null || x === undefined) return "—";
    const decimals = x >= 100 ? 0 : 2;
    return Number(x).toLocaleString(undefined, { minimumFractionDigits: decimals, maximumFractionDigits: decimals });
  },
  int(n) { return n === null || n === undefined ? "—" : Math.round(n).toLocaleString(); },
  loss(x) { return x === null || x === undefined ? "—" : Number(x).toFixed(4); },
  /** A share as a percentage: 0.875 → "87.5%". */
  percent(x) { return x === null || x === undefined ? "—" : `${(100 * Number(x)).toFixed(1)}%`; },
  small(x) { return x === null || x === undefined ? "—" : Number(x).toPrecision(3); },
  seconds(s) {
    if (s === null || s === undefined) return "—";
    if (s < 90) return `${s.toFixed(1)} s`;
    if (s < 5400) return `${(s / 60).toFixed(1)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  },
  duration(from, to) {
    if (!from) return "—";
    return fmt.seconds(((to ? new Date(to) : new Date()) - new Date(from)) / 1000);
  },
};
