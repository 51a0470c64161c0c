/* duecourse: small progressive enhancements. Every page works without this file. */
(function () {
  "use strict";
  var refreshing = {};

  // Replace the element with the same id from a freshly fetched page or fragment.
  function swap(el, html) {
    var doc = new DOMParser().parseFromString(html, "text/html");
    var fresh = doc.getElementById(el.id);
    if (fresh) { el.replaceWith(fresh); init(fresh); return fresh; }
    return el;
  }

  // current(): whether this answer is still wanted (a newer request may have been sent meanwhile).
  function fetchInto(el, url, current) {
    return fetch(url, { headers: { "X-Requested-With": "fetch" }, credentials: "same-origin" })
      .then(function (r) { if (r.redirected && /\/login/.test(r.url)) { location.reload(); } return r.text(); })
      .then(function (html) {
        if (current && !current()) return el;
        return swap(document.getElementById(el.id) || el, html);
      });
  }

  // data-refresh="/url" data-interval="5000": re-fetch a live part of the page while it is open.
  function startRefresh(el) {
    var ms = parseInt(el.dataset.interval || "5000", 10);
    var timer = setInterval(function () {
      var cur = document.getElementById(el.id);
      if (!cur) { clearInterval(timer); return; }
      if (document.hidden || cur.querySelector("details[open]") || cur.contains(document.activeElement) && document.activeElement.tagName !== "BODY") return;
      var url = cur.dataset.refresh + (cur.dataset.refresh.indexOf("?") < 0 ? location.search : "");
      fetchInto(cur, url);
    }, ms);
  }

  // form[data-live]: filter as you type; the result region is the element named by data-live.
  function liveForm(form) {
    var t, latest = 0;
    function go() {
      var target = document.getElementById(form.dataset.live);
      var qs = new URLSearchParams(new FormData(form)).toString();
      var url = form.action.split("?")[0] + (qs ? "?" + qs : "");
      var mine = ++latest;  // answers arriving out of order never replace a newer result
      history.replaceState(null, "", url);
      if (target) fetchInto(target, url, function () { return mine === latest; });
    }
    form.addEventListener("input", function () { clearTimeout(t); t = setTimeout(go, 200); });
    form.addEventListener("change", function () { clearTimeout(t); t = setTimeout(go, 50); });
    form.addEventListener("submit", function (e) { e.preventDefault(); go(); });
  }

  // Stages: renumber field names after a reorder so the server reads them in the new order.
  function renumber(list) {
    var items = list.querySelectorAll(":scope > li.stage");
    items.forEach(function (li, i) {
      li.querySelectorAll("[name^='stages[']").forEach(function (inp) {
        inp.name = inp.name.replace(/^stages\[\d+\]/, "stages[" + i + "]");
      });
      li.querySelectorAll("[data-error-for^='stages[']").forEach(function (e) {
        e.dataset.errorFor = e.dataset.errorFor.replace(/^stages\[\d+\]/, "stages[" + i + "]");
      });
      var num = li.querySelector(".stage-num"); if (num) num.textContent = "Stage " + (i + 1);
      li.querySelectorAll("button[data-move]").forEach(function (b) {
        b.value = b.dataset.move + ":" + i;
        b.setAttribute("aria-label", "Move stage " + (i + 1) + " " + b.dataset.move);
        b.disabled = (b.dataset.move === "up" && i === 0) || (b.dataset.move === "down" && i === items.length - 1);
      });
      li.querySelectorAll("button[data-remove]").forEach(function (b) { b.value = "remove:" + i; b.setAttribute("aria-label", "Remove stage " + (i + 1)); });
    });
  }

  function sortable(list) {
    if (list.closest("fieldset[disabled]")) return;  // read-only editor
    var dragged = null;
    list.querySelectorAll(":scope > li.stage").forEach(function (li) {
      var handle = li.querySelector(".stage-handle");
      if (handle) {
        handle.addEventListener("mousedown", function () { li.draggable = true; });
        handle.addEventListener("mouseup", function () { li.draggable = false; });
      }
      li.addEventListener("dragstart", function (e) { dragged = li; li.classList.add("dragging"); e.dataTransfer.effectAllowed = "move"; e.dataTransfer.setData("text/plain", ""); });
      li.addEventListener("dragend", function () { li.classList.remove("dragging"); li.draggable = false; dragged = null; list.querySelectorAll(".drop-target").forEach(function (x) { x.classList.remove("drop-target"); }); renumber(list); });
      li.addEventListener("dragover", function (e) {
        if (!dragged || dragged === li) return;
        e.preventDefault();
        var r = li.getBoundingClientRect();
        var after = e.clientY > r.top + r.height / 2;
        list.insertBefore(dragged, after ? li.nextSibling : li);
      });
    });
    list.addEventListener("drop", function (e) { if (dragged) e.preventDefault(); });
    // Up/down without a round trip when scripting is available (the buttons post to the server otherwise).
    list.addEventListener("click", function (e) {
      var b = e.target.closest("button[data-move]");
      if (!b) return;
      e.preventDefault();
      var li = b.closest("li.stage");
      if (b.dataset.move === "up" && li.previousElementSibling) list.insertBefore(li, li.previousElementSibling);
      if (b.dataset.move === "down" && li.nextElementSibling) list.insertBefore(li.nextElementSibling, li);
      renumber(list);
    });
  }

  // Stage action type: show matching templates and the retry fields of voice and whatsapp.
  function stageAction(sel) {
    function apply() {
      var li = sel.closest("li.stage"); if (!li) return;
      var action = sel.value;
      var tpl = li.querySelector("select[data-templates]");
      if (tpl) {
        var takes = ["email", "sms", "whatsapp", "voice"].indexOf(action) >= 0;
        tpl.closest(".field").style.display = takes ? "" : "none";
        tpl.querySelectorAll("option[data-channel]").forEach(function (o) {
          var ok = o.dataset.channel === action;
          o.hidden = !ok; o.disabled = !ok;
          if (!ok && o.selected) tpl.value = "";
        });
      }
      li.querySelectorAll("[data-retry]").forEach(function (f) { f.style.display = (action === "voice" || action === "whatsapp") ? "" : "none"; });
    }
    sel.addEventListener("change", apply);
    apply();
  }

  // data-show-when="name=value": show an element only while the named control has that value.
  function showWhen(root) {
    root.querySelectorAll("[data-show-when]").forEach(function (el) {
      var parts = el.dataset.showWhen.split("="), form = el.closest("form");
      if (!form) return;
      function apply() {
        var c = form.querySelector("[name='" + parts[0] + "']:checked") || form.querySelector("select[name='" + parts[0] + "']");
        el.style.display = c && c.value === parts[1] ? "" : "none";
      }
      form.querySelectorAll("[name='" + parts[0] + "']").forEach(function (c) { c.addEventListener("change", apply); });
      apply();
    });
  }

  // form[data-upload-progress="id"]: send the form with XMLHttpRequest so the <progress id> shows the
  // upload; once the file is up the bar turns indeterminate while the server works, then the answer
  // replaces the page. Without JS the form posts as usual.
  function uploadForm(form) {
    form.addEventListener("submit", function (e) {
      if (e.defaultPrevented || !window.FormData) return;
      e.preventDefault();
      var bar = document.getElementById(form.dataset.uploadProgress);
      var xhr = new XMLHttpRequest();
      xhr.open("POST", form.action);
      if (bar) bar.hidden = false;
      xhr.upload.onprogress = function (ev) { if (bar && ev.lengthComputable) bar.value = Math.round(100 * ev.loaded / ev.total); };
      xhr.upload.onload = function () { if (bar) bar.removeAttribute("value"); };
      xhr.onload = function () {
        document.open(); document.write(xhr.responseText); document.close();
        if (xhr.responseURL) history.replaceState(null, "", xhr.responseURL);
      };
      xhr.onerror = function () { HTMLFormElement.prototype.submit.call(form); };
      xhr.send(new FormData(form));
    });
  }

  function init(root) {
    root.querySelectorAll("[data-refresh]").forEach(function (el) { if (!refreshing[el.id]) { refreshing[el.id] = true; startRefresh(el); } });
    root.querySelectorAll("form[data-live]").forEach(liveForm);
    root.querySelectorAll("form[data-upload-progress]").forEach(uploadForm);
    root.querySelectorAll("ol[data-sortable]").forEach(sortable);
    root.querySelectorAll("select[data-action-select]").forEach(stageAction);
    root.querySelectorAll("form[data-confirm]").forEach(function (f) {
      f.addEventListener("submit", function (e) { if (!confirm(f.dataset.confirm)) e.preventDefault(); });
    });
    showWhen(root);
  }

  document.addEventListener("DOMContentLoaded", function () { init(document); });
  document.addEventListener("click", function (e) {
    // Close other open row menus.
    document.querySelectorAll("details.menu[open]").forEach(function (d) { if (!d.contains(e.target)) d.removeAttribute("open"); });
  });
})();
