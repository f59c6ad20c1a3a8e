// The trajectory browser of a tora report. Record text is hostile: it only
// ever reaches the page through textContent, never as markup.
(function () {
  "use strict";
  var PAGE = 100;
  var rows = JSON.parse(document.getElementById("tora-data").textContent).t;
  var state = { filter: "all", query: "", page: 0, shown: [], selected: -1 };

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function verdict(r) {
    if (r.c === true) return "correct";
    if (r.c === false) return "wrong";
    return r.gs || "ungraded";
  }

  var FILTERS = {
    all: function () { return true; },
    correct: function (r) { return r.c === true; },
    wrong: function (r) { return r.c === false; },
    ungraded: function (r) { return r.c === null || r.c === undefined; },
    failed: function (r) { return r.fin === "error" || r.fin === "interrupted"; },
    cellerror: function (r) { return r.ee > 0; },
    kept: function (r) { return r.why === "kept"; },
    notkept: function (r) { return r.why !== undefined && r.why !== "kept"; }
  };
  // A curation run's rows say whether each was kept (and why not): only then are those filters shown.
  var curated = rows.some(function (r) { return r.why !== undefined; });

  function matches(r) {
    if (!FILTERS[state.filter](r)) return false;
    if (!state.query) return true;
    var q = state.query;
    return [r.pid, r.q, r.pred, r.ref].some(function (s) {
      return s !== null && s !== undefined && String(s).toLowerCase().indexOf(q) >= 0;
    });
  }

  function refilter() {
    state.shown = [];
    for (var i = 0; i < rows.length; i++) if (matches(rows[i])) state.shown.push(i);
    state.page = 0;
    renderList();
  }

  function renderList() {
    var body = document.querySelector("#list tbody");
    var pages = Math.max(1, Math.ceil(state.shown.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    body.replaceChildren();
    var start = state.page * PAGE;
    state.shown.slice(start, start + PAGE).forEach(function (i) {
      var r = rows[i];
      var tr = el("tr");
      tr.dataset.index = String(i);
      if (i === state.selected) tr.className = "sel";
      tr.appendChild(el("td", "", i));
      tr.appendChild(el("td", "ans", r.pid + (r.k ? " #" + r.k : "")));
      var v = el("td");
      v.appendChild(el("span", "tag " + verdict(r), verdict(r)));
      if (r.why !== undefined) v.appendChild(el("span", "tag " + (r.why === "kept" ? "correct" : "why"), r.why));
      tr.appendChild(v);
      tr.appendChild(el("td", "", r.fin));
      tr.appendChild(el("td", "", r.tc));
      tr.appendChild(el("td", "ans", r.pred));
      tr.appendChild(el("td", "ans", r.ref));
      body.appendChild(tr);
    });
    document.getElementById("count").textContent = state.shown.length + " of " + rows.length + " trajectories";
    document.getElementById("page").textContent = "page " + (state.page + 1) + " of " + pages;
    document.getElementById("prev").disabled = state.page === 0;
    document.getElementById("next").disabled = state.page >= pages - 1;
  }

  function panel(kind, head, text, bad) {
    var box = el("div", "panel " + kind + (bad ? " bad" : ""));
    box.appendChild(el("div", "head", head));
    box.appendChild(el("pre", "", text));
    return box;
  }

  function renderDetail(i) {
    var r = rows[i];
    var box = document.getElementById("detail");
    box.replaceChildren();
    if (!r) { box.appendChild(el("p", "muted", "No trajectory " + i + ".")); return; }
    state.selected = i;
    box.appendChild(el("h3", "", "#" + i + " · problem " + r.pid + " · sample " + r.k));
    var facts = el("p");
    facts.appendChild(el("span", "tag " + verdict(r), verdict(r)));
    if (r.why !== undefined) facts.appendChild(el("span", "tag " + (r.why === "kept" ? "correct" : "why"), r.why));
    facts.appendChild(document.createTextNode(" finish " + r.fin + " · answer " + r.pred + " · reference " + r.ref +
      " · " + r.tc + " tool calls · origin " + r.origin));
    box.appendChild(facts);
    if (r.err) box.appendChild(el("p", "err", "error" + (r.ek ? " (" + r.ek + ")" : "") + ": " + r.err));
    if (r.v) {
      box.appendChild(el("p", "", r.v.map(function (v) { return v[0] + ": " + v[1] + " (" + v[2] + ")"; }).join(" · ")));
    }
    box.appendChild(panel("question", "question", r.q));
    r.turns.forEach(function (t, n) {
      if (t.p && t.p.trim()) box.appendChild(el("div", "prose", t.p));
      if (t.code === undefined) return;
      box.appendChild(panel("code", "code " + (n + 1), t.code));
      var bad = t.st !== "ok";
      var out = panel("out", "output · " + t.st + (t.en ? " · " + t.en + ": " + t.ev : ""), t.out, bad);
      if (t.tb) {
        var details = el("details");
        details.appendChild(el("summary", "", "traceback"));
        details.appendChild(el("pre", "", t.tb));
        out.appendChild(details);
      }
      box.appendChild(out);
    });
    renderList();
  }

  function route() {
    var m = /^#t=(\d+)$/.exec(location.hash);
    if (m) {
      renderDetail(Number(m[1]));
      document.getElementById("browser").scrollIntoView();
    }
  }

  document.querySelectorAll(".filters button").forEach(function (b) {
    if (b.dataset.filter === "kept" || b.dataset.filter === "notkept") b.hidden = !curated;
    b.addEventListener("click", function () {
      document.querySelectorAll(".filters button").forEach(function (o) { o.classList.toggle("on", o === b); });
      state.filter = b.dataset.filter;
      refilter();
    });
  });
  var timer = null;
  document.getElementById("search").addEventListener("input", function (e) {
    clearTimeout(timer);
    var value = e.target.value;
    timer = setTimeout(function () { state.query = value.trim().toLowerCase(); refilter(); }, 150);
  });
  document.getElementById("prev").addEventListener("click", function () { state.page--; renderList(); });
  document.getElementById("next").addEventListener("click", function () { state.page++; renderList(); });
  document.querySelector("#list tbody").addEventListener("click", function (e) {
    var tr = e.target.closest("tr");
    if (tr) location.hash = "#t=" + tr.dataset.index;
  });
  window.addEventListener("hashchange", route);
  refilter();
  route();
})();
