// The gateway's web UI: a client of the /api/v1 routes, signed in with a session cookie.
// Every name shown (keys, tenant names, users) is chosen by someone else: it is only ever
// set as text (textContent, createTextNode, attribute values), never parsed as HTML.

const NULL_TENANT = "default"; // a reserved word: no tenant can have this id
const PAGE_SIZE = 50;
const PREVIEW_BYTES = 1024 * 1024;
const TEXT_TYPES = /^(text\/|application\/(json|xml|x-yaml|yaml|x-ndjson|javascript))/;
const TEXT_EXTENSIONS = /\.(txt|csv|tsv|json|ndjson|ion|ya?ml|log|md|py|sql|xml|sh|ini|toml|properties)$/i;
const IMAGE_TYPES = new Set(["image/png", "image/jpeg", "image/gif", "image/webp"]);

const state = {
  session: null, // the GET /api/v1/session answer
  tenants: [], // [{id, name}] the dropdown lists; id NULL_TENANT for the null tenant
  tenant: null,
  cursors: [null], // the cursor of each listing page seen so far
  page: 0,
};

// -- small helpers ---------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

// h("a", {href: "/x", class: "y"}, "text", child): an element; strings become text nodes.
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(typeof child === "string" || typeof child === "number" ? document.createTextNode(String(child)) : child);
  }
  return el;
}

function encodeKey(key) {
  return key.split("/").map(encodeURIComponent).join("/");
}

function apiBase(tenant) {
  return tenant === NULL_TENANT ? "/api/v1" : `/api/v1/${encodeURIComponent(tenant)}`;
}

function uiPath(tenant, view, key = "") {
  return `/ui/${encodeURIComponent(tenant)}/${view}${key ? encodeKey(key) : ""}`;
}

function formatSize(bytes) {
  if (bytes === null || bytes === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

function formatTime(ms) {
  if (!ms) return "";
  return new Date(ms).toISOString().slice(0, 19).replace("T", " ") + " UTC";
}

function showStatus(message, kind = "info") {
  const status = $("status");
  status.textContent = message;
  status.className = kind;
  status.hidden = !message;
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

// fetch with the session cookie; a change carries the session's CSRF token.
async function api(method, url, { json, headers = {}, raw = false } = {}) {
  const init = { method, headers: { ...headers }, credentials: "same-origin" };
  if (method !== "GET" && method !== "HEAD" && state.session && state.session.csrfToken) {
    init.headers["X-CSRF-Token"] = state.session.csrfToken;
  }
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  const response = await fetch(url, init);
  if (response.status === 401 && state.session) {
    state.session = null;
    renderSignIn("Your session has ended: sign in again.");
    throw new ApiError(401, { message: "signed out" });
  }
  if (!response.ok) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    throw new ApiError(response.status, body);
  }
  if (raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

// -- dialogs ---------------------------------------------------------------------------------

function ask(message, { input = null, okLabel = "OK" } = {}) {
  const dialog = $("dialog");
  $("dialog-message").textContent = message;
  $("dialog-ok").textContent = okLabel;
  const field = $("dialog-input");
  $("dialog-label").hidden = input === null;
  if (input !== null) {
    $("dialog-label-text").textContent = input.label;
    field.value = input.value || "";
    field.required = true;
  } else {
    field.required = false;
  }
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        if (dialog.returnValue !== "ok") resolve(null);
        else resolve(input === null ? true : field.value);
      },
      { once: true },
    );
    dialog.returnValue = "";
    dialog.showModal();
    if (input !== null) field.select();
  });
}

// -- routing ---------------------------------------------------------------------------------

// /ui/{tenant}/files/{folder}/ | /ui/{tenant}/admin/tenants | /ui/{tenant}/admin/members
function parseLocation() {
  const parts = location.pathname.split("/").slice(2); // drop "" and "ui"
  const tenant = parts[0] ? decodeURIComponent(parts[0]) : null;
  const view = parts[1] || "files";
  if (view === "admin") return { tenant, view: parts[2] === "members" ? "members" : "tenants" };
  const folder = parts.slice(2).map(decodeURIComponent).join("/");
  return { tenant, view: "files", folder };
}

function navigate(url) {
  if (url !== location.pathname + location.search) history.pushState(null, "", url);
  route();
}

document.addEventListener("click", (event) => {
  const link = event.target.closest("a[data-route]");
  if (!link || event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
  event.preventDefault();
  closeMenus();
  navigate(link.getAttribute("href"));
});
window.addEventListener("popstate", () => route());

async function route() {
  if (!state.session) return;
  const where = parseLocation();
  if (!where.tenant || !state.tenants.some((t) => t.id === where.tenant)) {
    const first = state.tenants[0];
    if (!where.tenant && first) {
      history.replaceState(null, "", uiPath(first.id, "files/"));
      return route();
    }
  }
  state.tenant = where.tenant;
  renderHeader();
  showStatus("");
  if (!state.tenant) {
    renderMessage("You have no access to any tenant yet. Ask an administrator for a role.");
  } else if (where.view === "tenants") {
    await renderTenants();
  } else if (where.view === "members") {
    await renderMembers();
  } else {
    await renderFiles(where.folder);
  }
}

// -- session ---------------------------------------------------------------------------------

async function loadSession() {
  const response = await fetch("/api/v1/session", { credentials: "same-origin" });
  if (response.status === 401) return null;
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
  return response.json();
}

async function loadTenants() {
  const session = state.session;
  const bound = new Set(session.bindings.map((b) => b.tenant));
  const tenants = [];
  if (session.tenancy.nullTenant && (bound.has(null) || session.kind === "anonymous")) {
    tenants.push({ id: NULL_TENANT, name: "Default tenant" });
  }
  if (session.tenancy.enabled) {
    const listed = await api("GET", "/api/v1/tenants");
    for (const tenant of listed) {
      if (!tenant.deleted && (session.kind === "anonymous" || bound.has(tenant.id))) {
        tenants.push({ id: tenant.id, name: tenant.name });
      }
    }
  }
  state.tenants = tenants;
}

function renderSignIn(message = "") {
  $("header").hidden = true;
  showStatus("");
  const error = h("p", { id: "sign-in-error", class: "error", role: "alert" }, message);
  const form = h(
    "form",
    { id: "sign-in", class: "card" },
    h("h1", {}, "Sign in"),
    h("label", {}, "Username", h("input", { name: "username", autocomplete: "username", required: true })),
    h(
      "label",
      {},
      "Password",
      h("input", { name: "password", type: "password", autocomplete: "current-password", required: true }),
    ),
    h("button", { type: "submit" }, "Sign in"),
    error,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    const response = await fetch("/api/v1/session", {
      method: "POST",
      body: new URLSearchParams(new FormData(form)),
      credentials: "same-origin",
    });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      error.textContent = (body && body.message) || `HTTP ${response.status}`;
      return;
    }
    await start(await response.json());
  });
  $("main").replaceChildren(form);
  form.elements.username.focus();
}

async function start(session) {
  state.session = session;
  try {
    await loadTenants();
  } catch (error) {
    showStatus(error.message, "error");
  }
  await route();
}

async function signOut() {
  try {
    await api("DELETE", "/api/v1/session");
  } finally {
    state.session = null;
    history.pushState(null, "", "/ui/");
    renderSignIn("Signed out.");
  }
}

// -- header: tenant dropdown, administration menu ---------------------------------------------

function closeMenus() {
  for (const [button, menu] of [["tenant-button", "tenant-menu"], ["admin-button", "admin-menu"]]) {
    $(menu).hidden = true;
    $(button).setAttribute("aria-expanded", "false");
  }
}

function toggle(buttonId, menuId) {
  const open = $(menuId).hidden;
  closeMenus();
  $(menuId).hidden = !open;
  $(buttonId).setAttribute("aria-expanded", String(open));
}

function isAdminOf(tenant) {
  const session = state.session;
  const id = tenant === NULL_TENANT ? null : tenant;
  return session.superAdmin || session.bindings.some((b) => b.tenant === id && b.role === "ADMIN");
}

function renderHeader() {
  const session = state.session;
  $("header").hidden = false;
  const where = parseLocation();
  const current = state.tenants.find((t) => t.id === state.tenant);
  $("tenant-current").textContent = current ? current.name : state.tenant || "none";
  const items = state.tenants.map((tenant) => {
    const view = where.view === "files" ? "files/" : `admin/${where.view}`;
    const selected = tenant.id === state.tenant;
    return h(
      "li",
      { role: "option", "aria-selected": String(selected), "data-tenant": tenant.id },
      h(
        "a",
        { href: uiPath(tenant.id, view), "data-route": true },
        h("span", { class: "tenant-name" }, tenant.name),
        tenant.id !== NULL_TENANT && tenant.name !== tenant.id ? h("span", { class: "tenant-id" }, tenant.id) : null,
      ),
    );
  });
  $("tenant-menu").replaceChildren(...items);
  $("tenant-picker").hidden = state.tenants.length === 0;
  const tenant = state.tenant || NULL_TENANT;
  $("nav-files").setAttribute("href", uiPath(tenant, "files/"));
  $("nav-files").setAttribute("data-route", "");
  $("nav-tenants").setAttribute("href", uiPath(tenant, "admin/tenants"));
  $("nav-tenants").setAttribute("data-route", "");
  $("nav-members").setAttribute("href", uiPath(tenant, "admin/members"));
  $("nav-members").setAttribute("data-route", "");
  const creates = session.superAdmin || session.canCreateTenants;
  const admins = session.bindings.some((b) => b.role === "ADMIN");
  $("admin-picker").hidden = !(creates || admins);
  $("nav-tenants").parentElement.hidden = !(creates || session.superAdmin);
  $("nav-members").parentElement.hidden = !(state.tenant && isAdminOf(state.tenant));
  $("who").textContent = session.kind === "anonymous" ? "authentication off" : session.name;
  $("sign-out").hidden = !session.csrfToken;
}

function renderMessage(text) {
  $("main").replaceChildren(h("p", { class: "card" }, text));
}

// -- files -----------------------------------------------------------------------------------

async function renderFiles(folder) {
  const tenant = state.tenant;
  const base = apiBase(tenant);
  const key = folder.replace(/\/+$/, "");
  if (state.folder !== `${tenant}\u0000${key}`) {
    state.folder = `${tenant}\u0000${key}`;
    state.cursors = [null];
    state.page = 0;
  }
  const cursor = state.cursors[state.page];
  const asked = Number(new URLSearchParams(location.search).get("limit"));
  const limit = Number.isInteger(asked) && asked >= 1 && asked <= 1000 ? asked : PAGE_SIZE;
  const query = new URLSearchParams({ limit: String(limit) });
  if (cursor) query.set("cursor", cursor);
  const listUrl = `${base}/list${key ? "/" + encodeKey(key) : ""}?${query}`;

  const crumbs = [h("a", { href: uiPath(tenant, "files/"), "data-route": true }, tenantLabel(tenant))];
  const segments = key ? key.split("/") : [];
  segments.forEach((segment, i) => {
    crumbs.push(h("span", { class: "sep" }, "/"));
    const path = segments.slice(0, i + 1).join("/") + "/";
    crumbs.push(
      i === segments.length - 1
        ? h("span", { "aria-current": "page" }, segment)
        : h("a", { href: uiPath(tenant, "files/", path), "data-route": true }, segment),
    );
  });

  const fileInput = h("input", { type: "file", id: "upload-input", multiple: true, hidden: true });
  fileInput.addEventListener("change", () => upload(fileInput.files, key));
  const uploads = h("ul", { id: "uploads" });
  const drop = h(
    "div",
    { id: "drop-zone", class: "drop-zone" },
    "Drop files here to upload them to this folder, or ",
    h("label", { for: "upload-input", class: "link" }, "choose files"),
    ".",
    fileInput,
  );
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    upload(event.dataTransfer.files, key);
  });
  const table = h("table", { id: "listing" });
  const pager = h("div", { class: "pager" });
  const preview = h("aside", { id: "preview", hidden: true });
  const toolbar = h(
    "div",
    { class: "toolbar" },
    h("button", { type: "button", id: "new-folder", onclick: () => newFolder(key) }, "New folder"),
    h("label", { for: "upload-input", class: "button", id: "upload-button" }, "Upload"),
  );
  $("main").replaceChildren(
    h("nav", { class: "breadcrumbs", "aria-label": "Folder" }, crumbs),
    toolbar,
    drop,
    uploads,
    h("div", { class: "split" }, h("div", { class: "table-wrap" }, table, pager), preview),
  );

  let page;
  try {
    page = await api("GET", listUrl);
  } catch (error) {
    table.replaceChildren(h("caption", { class: "error" }, error.message));
    return;
  }
  const head = h(
    "thead",
    {},
    h("tr", {}, h("th", {}, "Name"), h("th", { class: "num" }, "Size"), h("th", {}, "Modified"), h("th", {}, "Actions")),
  );
  const rows = page.entries.map((entry) => fileRow(tenant, entry));
  const body = h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 4, class: "empty" }, "This folder is empty.")));
  table.replaceChildren(head, body);
  if (page.cursor) state.cursors[state.page + 1] = page.cursor;
  const previous = h("button", { type: "button", id: "page-previous", disabled: state.page === 0 }, "Previous");
  const next = h("button", { type: "button", id: "page-next", disabled: !page.cursor }, "Next");
  previous.addEventListener("click", () => {
    state.page -= 1;
    renderFiles(key);
  });
  next.addEventListener("click", () => {
    state.page += 1;
    renderFiles(key);
  });
  pager.replaceChildren(previous, h("span", {}, `Page ${state.page + 1}`), next);
}

function tenantLabel(tenant) {
  const found = state.tenants.find((t) => t.id === tenant);
  return found ? found.name : tenant;
}

function fileRow(tenant, entry) {
  const base = apiBase(tenant);
  const isDir = entry.type === "Directory";
  const name = isDir
    ? h("a", { href: uiPath(tenant, "files/", entry.key + "/"), "data-route": true, class: "dir" }, entry.fileName + "/")
    : h("button", { type: "button", class: "link file", onclick: () => showPreview(tenant, entry) }, entry.fileName);
  const actions = h("td", { class: "actions" });
  if (!isDir) {
    actions.append(
      h("a", { href: `${base}/files/${encodeKey(entry.key)}`, download: entry.fileName, class: "download" }, "Download"),
      h("button", { type: "button", class: "link copy-uri", onclick: () => copyUri(entry.uri) }, "Copy URI"),
    );
  }
  actions.append(
    h("button", { type: "button", class: "link rename", onclick: () => moveEntry(tenant, entry) }, "Move/rename"),
    h("button", { type: "button", class: "link danger delete", onclick: () => deleteEntry(tenant, entry) }, "Delete"),
  );
  return h(
    "tr",
    { "data-key": entry.key },
    h("td", { class: "name" }, name),
    h("td", { class: "num" }, isDir ? "" : formatSize(entry.size)),
    h("td", {}, formatTime(entry.lastModifiedTime)),
    actions,
  );
}

function refreshFiles() {
  return renderFiles(parseLocation().folder || "");
}

function upload(files, folder) {
  const tenant = state.tenant;
  const list = $("uploads");
  let pending = files.length;
  for (const file of files) {
    const key = folder ? `${folder}/${file.name}` : file.name;
    const bar = h("progress", { max: 100, value: 0 });
    const note = h("span", { class: "note" }, "");
    list.append(h("li", {}, h("span", {}, file.name), bar, note));
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", `${apiBase(tenant)}/files/${encodeKey(key)}`);
    xhr.setRequestHeader("X-CSRF-Token", state.session.csrfToken || "");
    if (file.type) xhr.setRequestHeader("Content-Type", file.type);
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) bar.value = Math.round((100 * event.loaded) / event.total);
    });
    xhr.addEventListener("loadend", () => {
      if (xhr.status === 201) {
        bar.value = 100;
        note.textContent = "uploaded";
      } else {
        let message = `failed (HTTP ${xhr.status})`;
        try {
          message = `failed: ${JSON.parse(xhr.responseText).message}`;
        } catch {
          // not JSON: keep the status
        }
        note.textContent = message;
        note.className = "note error";
      }
      pending -= 1;
      if (pending === 0) refreshFiles().then(() => $("uploads").replaceChildren(...list.children));
    });
    xhr.send(file);
  }
}

async function newFolder(folder) {
  const name = await ask("New folder in this folder:", { input: { label: "Name" }, okLabel: "Create" });
  if (!name) return;
  const key = folder ? `${folder}/${name}` : name;
  try {
    await api("POST", `${apiBase(state.tenant)}/directories/${encodeKey(key)}`);
    await refreshFiles();
  } catch (error) {
    showStatus(error.message, "error");
  }
}

async function moveEntry(tenant, entry) {
  const target = await ask(`Move or rename “${entry.key}” to:`, {
    input: { label: "New key", value: entry.key },
    okLabel: "Move",
  });
  if (!target || target === entry.key) return;
  try {
    await api("POST", `${apiBase(tenant)}/move`, { json: { from: entry.key, to: target } });
    await refreshFiles();
    showStatus(`Moved to ${target}.`);
  } catch (error) {
    showStatus(error.message, "error");
  }
}

async function deleteEntry(tenant, entry) {
  const isDir = entry.type === "Directory";
  const message = isDir
    ? `Delete the folder “${entry.key}” and everything in it?`
    : `Delete “${entry.key}”?`;
  if (!(await ask(message, { okLabel: "Delete" }))) return;
  try {
    const query = isDir ? "?recursive=true" : "";
    await api("DELETE", `${apiBase(tenant)}/files/${encodeKey(entry.key)}${query}`);
    await refreshFiles();
    showStatus(`Deleted ${entry.key}.`);
  } catch (error) {
    showStatus(error.message, "error");
  }
}

async function copyUri(uri) {
  try {
    await navigator.clipboard.writeText(uri);
    showStatus(`Copied ${uri}`);
  } catch {
    showStatus(`Copy this URI: ${uri}`);
  }
}

async function showPreview(tenant, entry) {
  const panel = $("preview");
  const url = `${apiBase(tenant)}/files/${encodeKey(entry.key)}`;
  const uriField = h("input", { readonly: true, value: entry.uri, id: "preview-uri", "aria-label": "kestra URI" });
  const content = h("div", { class: "preview-content" }, "Loading…");
  panel.hidden = false;
  panel.replaceChildren(
    h("h2", {}, entry.fileName),
    h(
      "p",
      { class: "uri" },
      uriField,
      h("button", { type: "button", onclick: () => copyUri(entry.uri) }, "Copy"),
    ),
    h("p", {}, `${formatSize(entry.size)} · ${formatTime(entry.lastModifiedTime)} · `, h("a", { href: url, download: entry.fileName }, "Download")),
    content,
    h("button", { type: "button", class: "link", onclick: () => (panel.hidden = true) }, "Close preview"),
  );
  let response;
  try {
    // The first MiB only (a Range on an empty file would be refused: none asked then).
    const headers = entry.size > PREVIEW_BYTES ? { Range: `bytes=0-${PREVIEW_BYTES - 1}` } : {};
    response = await api("GET", url, { raw: true, headers });
  } catch (error) {
    content.textContent = error.message;
    return;
  }
  const type = (response.headers.get("Content-Type") || "").split(";")[0].trim().toLowerCase();
  const data = await response.arrayBuffer();
  const cut = entry.size > PREVIEW_BYTES;
  if (IMAGE_TYPES.has(type)) {
    const image = h("img", { alt: entry.fileName, src: URL.createObjectURL(new Blob([data], { type })) });
    content.replaceChildren(image);
  } else if (TEXT_TYPES.test(type) || TEXT_EXTENSIONS.test(entry.fileName)) {
    const text = new TextDecoder("utf-8").decode(data);
    content.replaceChildren(h("pre", { id: "preview-text" }, text));
    if (cut) content.append(h("p", { class: "note" }, `Shown: the first MiB of ${formatSize(entry.size)}.`));
  } else {
    content.textContent = "No preview for this type of file: download it.";
  }
}

// -- administration ----------------------------------------------------------------------------

async function renderTenants() {
  const session = state.session;
  const creates = session.superAdmin || session.canCreateTenants;
  const main = $("main");
  const notice = h("p", { id: "tenant-notice", role: "status" });
  const form = h(
    "form",
    { id: "create-tenant", class: "card", hidden: true },
    h("h2", {}, "Create a tenant"),
    h(
      "label",
      {},
      "Id",
      h("input", {
        name: "id",
        required: true,
        pattern: "[a-z0-9][a-z0-9_\\-]{0,62}",
        placeholder: "e.g. stage",
        title: "1-63 of a-z, 0-9, - and _, starting with a letter or digit",
      }),
    ),
    h("label", {}, "Name", h("input", { name: "name", placeholder: "e.g. Staging" })),
    h(
      "div",
      { class: "buttons" },
      h("button", { type: "submit", id: "create-tenant-submit" }, "Save"),
      h("button", { type: "button", onclick: () => (form.hidden = true) }, "Cancel"),
    ),
    h("p", { class: "error", id: "create-tenant-error", role: "alert" }),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const id = form.elements.id.value.trim();
    const name = form.elements.name.value.trim() || id;
    try {
      await api("POST", "/api/v1/tenants", { json: { id, name } });
    } catch (error) {
      $("create-tenant-error").textContent = error.message;
      return;
    }
    form.hidden = true;
    // The creator's new Admin role: the session's bindings and the dropdown are read again.
    state.session = { ...state.session, ...(await loadSession()) };
    await loadTenants();
    renderHeader();
    await renderTenants();
    const role = state.session.superAdmin ? "" : " You have the Admin role on it.";
    $("tenant-notice").textContent = `Tenant ${id} created.${role}`;
  });
  const create = h("button", { type: "button", id: "create-tenant-button", hidden: !creates }, "Create");
  create.addEventListener("click", () => {
    form.hidden = false;
    form.reset();
    form.elements.id.focus();
  });
  const table = h("table", { id: "tenants" });
  main.replaceChildren(h("div", { class: "title" }, h("h1", {}, "Administration → Tenants"), create), notice, form, table);
  let tenants;
  try {
    tenants = await api("GET", "/api/v1/tenants");
  } catch (error) {
    table.replaceChildren(h("caption", { class: "error" }, error.message));
    return;
  }
  const rows = tenants.map((tenant) => {
    const actions = h("td", { class: "actions" });
    if (session.superAdmin) {
      const label = tenant.deleted ? "Restore" : "Delete";
      actions.append(
        h("button", { type: "button", class: `link ${tenant.deleted ? "" : "danger"}`, onclick: () => setDeleted(tenant, !tenant.deleted) }, label),
      );
    }
    if (isAdminOf(tenant.id)) {
      actions.append(h("a", { href: uiPath(tenant.id, "admin/members"), "data-route": true }, "Members"));
    }
    return h(
      "tr",
      { "data-tenant": tenant.id },
      h("td", {}, tenant.id),
      h("td", {}, tenant.name),
      h("td", {}, tenant.deleted ? "deleted" : "active"),
      actions,
    );
  });
  table.replaceChildren(
    h("thead", {}, h("tr", {}, h("th", {}, "Id"), h("th", {}, "Name"), h("th", {}, "Status"), h("th", {}, "Actions"))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 4, class: "empty" }, "No tenants."))),
  );
}

async function setDeleted(tenant, deleted) {
  if (deleted && !(await ask(`Delete the tenant “${tenant.id}”? It can be restored.`, { okLabel: "Delete" }))) return;
  try {
    if (deleted) await api("DELETE", `/api/v1/tenants/${encodeURIComponent(tenant.id)}`);
    else await api("POST", `/api/v1/tenants/${encodeURIComponent(tenant.id)}/restore`);
    await loadTenants();
    renderHeader();
    await renderTenants();
  } catch (error) {
    showStatus(error.message, "error");
  }
}

async function renderMembers() {
  const tenant = state.tenant;
  const param = tenant === NULL_TENANT ? "" : `?tenant=${encodeURIComponent(tenant)}`;
  const table = h("table", { id: "members" });
  const kind = h("select", { name: "kind" }, h("option", { value: "user" }, "user"), h("option", { value: "service-account" }, "service account"));
  const role = h("select", { name: "role" }, ["VIEWER", "EDITOR", "ADMIN"].map((r) => h("option", { value: r }, r)));
  const form = h(
    "form",
    { id: "grant", class: "inline" },
    kind,
    h("input", { name: "subject", required: true, placeholder: "username or account", "aria-label": "Subject" }),
    role,
    h("button", { type: "submit" }, "Grant"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { tenant: tenant === NULL_TENANT ? null : tenant, kind: kind.value, subject: form.elements.subject.value, role: role.value };
    try {
      await api("PUT", "/api/v1/bindings", { json: body });
      await renderMembers();
    } catch (error) {
      showStatus(error.message, "error");
    }
  });
  $("main").replaceChildren(h("h1", {}, `Administration → Members of ${tenantLabel(tenant)}`), form, table);
  let members;
  try {
    members = await api("GET", `/api/v1/bindings${param}`);
  } catch (error) {
    table.replaceChildren(h("caption", { class: "error" }, error.message));
    return;
  }
  const rows = members.map((binding) =>
    h(
      "tr",
      {},
      h("td", {}, binding.kind),
      h("td", {}, binding.subject),
      h("td", {}, binding.role),
      h(
        "td",
        {},
        h(
          "button",
          {
            type: "button",
            class: "link danger",
            onclick: async () => {
              const who = `${binding.kind} ${binding.subject}`;
              if (!(await ask(`Revoke the ${binding.role} role of ${who}?`, { okLabel: "Revoke" }))) return;
              try {
                await api("DELETE", "/api/v1/bindings", { json: { tenant: binding.tenant, kind: binding.kind, subject: binding.subject } });
                await renderMembers();
              } catch (error) {
                showStatus(error.message, "error");
              }
            },
          },
          "Revoke",
        ),
      ),
    ),
  );
  table.replaceChildren(
    h("thead", {}, h("tr", {}, h("th", {}, "Kind"), h("th", {}, "Subject"), h("th", {}, "Role"), h("th", {}, ""))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 4, class: "empty" }, "No members."))),
  );
}

// -- start -----------------------------------------------------------------------------------

$("tenant-button").addEventListener("click", () => toggle("tenant-button", "tenant-menu"));
$("admin-button").addEventListener("click", () => toggle("admin-button", "admin-menu"));
$("sign-out").addEventListener("click", () => signOut());
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") closeMenus();
});
document.addEventListener("click", (event) => {
  if (!event.target.closest(".menu")) closeMenus();
});

(async () => {
  let session;
  try {
    session = await loadSession();
  } catch (error) {
    renderMessage(`The gateway did not answer: ${error.message}`);
    return;
  }
  if (session === null) renderSignIn();
  else await start(session);
})();
