// Switchboard web console: a client of the public HTTP API (docs: /docs, contract: API.md).
//
// Rules kept here: the bearer token lives in sessionStorage (this tab only) and travels only in
// the Authorization header, never in a URL; every piece of user, model or server text is put
// into the page with textContent, never parsed as HTML; no inline script or style (the page's
// Content-Security-Policy forbids both).
'use strict';

(function () {
  const TOKEN_KEY = 'switchboard.token';
  const state = {
    token: sessionStorage.getItem(TOKEN_KEY),
    me: null,
    projects: [],
    conversation: null,
    busy: false,
  };

  const $ = (id) => document.getElementById(id);

  // Element builder: `attrs` are set as properties (className, type, ...) or dataset entries
  // (`data: {...}`); children are nodes or strings (made text nodes).
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'data') {
        for (const [dk, dv] of Object.entries(v)) el.dataset[dk] = dv;
      } else {
        el[k] = v;
      }
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      el.append(typeof c === 'string' ? document.createTextNode(c) : c);
    }
    return el;
  }

  function show(el, text) {
    if (text === null || text === undefined || text === '') {
      el.hidden = true;
      el.textContent = '';
    } else {
      el.textContent = text;
      el.hidden = false;
    }
  }

  // ------------------------------------------------------------------ API calls and errors

  class ApiError extends Error {
    constructor(status, code, message, retryAfter) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfter = retryAfter;
    }
  }

  function headersFor(extra) {
    const headers = Object.assign({}, extra || {});
    if (state.token) headers['Authorization'] = 'Bearer ' + state.token;
    return headers;
  }

  async function errorOf(resp) {
    let code = 'http_' + resp.status;
    let message = '';
    try {
      const body = await resp.json();
      if (body && body.error) {
        code = body.error.code || code;
        message = body.error.message || '';
      }
    } catch (_) {
      // not JSON: keep the status
    }
    const ra = parseInt(resp.headers.get('Retry-After') || '', 10);
    return new ApiError(resp.status, code, message, Number.isFinite(ra) ? ra : null);
  }

  // A JSON call; throws ApiError (or TypeError when the network fails).
  async function api(method, path, body, extraHeaders) {
    const headers = headersFor(extraHeaders);
    const init = { method, headers };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(path, init);
    if (!resp.ok) {
      const err = await errorOf(resp);
      if (err.status === 401 && state.token && !path.startsWith('/v1/auth/')) signOut('Your session has ended; please sign in again.');
      throw err;
    }
    if (resp.status === 204) return null;
    return resp.json();
  }

  function waitText(secs) {
    if (secs === null || secs === undefined) return 'a little while';
    if (secs < 90) return secs + (secs === 1 ? ' second' : ' seconds');
    if (secs < 5400) return Math.round(secs / 60) + ' minutes';
    if (secs < 172800) return Math.round(secs / 3600) + ' hours';
    return Math.round(secs / 86400) + ' days';
  }

  // What a person reads for an error (an ApiError, an SSE `error` event, or a network failure).
  function describe(err) {
    if (err instanceof TypeError) {
      return 'Cannot reach the server. Check your connection and try again.';
    }
    const code = err.code || '';
    const msg = err.message || '';
    switch (code) {
      case 'budget_exceeded':
        return 'Your organization has used its token budget. It resets in ' + waitText(err.retryAfter) + '.';
      case 'rate_limited':
        return err.status === 429
          ? 'You are sending messages faster than allowed. Try again in ' + waitText(err.retryAfter) + '.'
          : 'The model is busy (rate limited) and the answer could not wait any longer. Please try again in a few minutes.';
      case 'too_many_streams':
        return 'Too many answers are streaming at once in your account. Close another tab or wait a moment.';
      case 'model_unavailable':
        return 'The assistant is unavailable right now: the model and its fallback both failed. Please try again in a few minutes.';
      case 'unknown_model':
        return 'That model is not available: ' + msg;
      case 'invalid_credentials':
        return 'Wrong email or password.';
      case 'conflict':
        return msg || 'That conflicts with the current state.';
      case 'forbidden':
        return 'You are not allowed to do that' + (msg ? ': ' + msg : '.');
      case 'unavailable':
        return 'The service is temporarily unavailable' + (msg ? ' (' + msg + ')' : '') + '. Please try again shortly.';
      case 'unauthorized':
        return 'Please sign in again.';
      default:
        if (err.status === 429) return 'Too many requests. Try again in ' + waitText(err.retryAfter) + '.';
        if (err.status >= 500) return 'Something went wrong on our side (' + err.status + '). Please try again.';
        return msg || 'The request failed (' + (err.status || code) + ').';
    }
  }

  // ------------------------------------------------------------------ sign in / out

  function setToken(token) {
    state.token = token;
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  }

  function signOut(reason) {
    setToken(null);
    state.me = null;
    state.conversation = null;
    state.projects = [];
    // nothing of this session stays on the page for whoever signs in next on this tab
    $('projects').replaceChildren();
    $('conversations').replaceChildren();
    $('messages').replaceChildren();
    $('chat-pane').hidden = true;
    $('chat-title').textContent = '';
    $('chat-scope').textContent = '';
    $('models-list').replaceChildren();
    $('app-view').hidden = true;
    $('whoami').hidden = true;
    $('auth-view').hidden = false;
    show($('auth-error'), reason || '');
  }

  async function signIn(email, password) {
    const t = await api('POST', '/v1/auth/login', { email, password });
    setToken(t.token);
    await start();
  }

  async function signUp(name, email, password, orgName) {
    const r = await api('POST', '/v1/auth/register', { email, password, name, org_name: orgName });
    setToken(r.token);
    await start();
  }

  function isAdmin() {
    return state.me && (state.me.role === 'owner' || state.me.role === 'admin');
  }

  async function start() {
    if (!state.token) {
      signOut();
      return;
    }
    try {
      state.me = await api('GET', '/v1/me');
    } catch (err) {
      signOut(err.status === 401 ? '' : describe(err));
      return;
    }
    $('auth-view').hidden = true;
    show($('auth-error'), '');
    $('app-view').hidden = false;
    $('whoami').hidden = false;
    $('whoami-text').textContent = state.me.user.email + ' · ' + state.me.org.name + ' (' + state.me.role + ')';
    await Promise.all([loadSettings(), loadProjects(), loadConversations()]);
  }

  // ------------------------------------------------------------------ model settings

  async function loadSettings() {
    const admin = isAdmin();
    $('model').disabled = !admin;
    $('fallback-model').disabled = !admin;
    $('settings-save').hidden = !admin;
    show($('settings-msg'), '');
    try {
      const s = await api('GET', '/v1/orgs/' + state.me.org.id + '/settings/model');
      $('model').value = s.model;
      $('fallback-model').value = s.fallback_model;
    } catch (err) {
      show($('settings-msg'), describe(err));
    }
    if (!admin) {
      $('models-note').textContent = 'Only owners and admins change the model.';
      return;
    }
    try {
      const list = await api('GET', '/v1/models');
      const dl = $('models-list');
      dl.replaceChildren();
      const routes = [];
      for (const m of list.items) {
        if (m.wildcard) {
          routes.push(m.name);
          dl.append(h('option', { value: m.name.replace(/\*.*$/, ''), label: m.name + ' (type a name)' }));
        } else {
          dl.append(h('option', { value: m.name }));
        }
      }
      $('models-note').textContent = routes.length
        ? 'Also any name under ' + routes.join(', ') + '.'
        : '';
    } catch (err) {
      $('models-note').textContent = 'Cannot list the models: ' + describe(err);
    }
  }

  async function saveSettings() {
    const body = { model: $('model').value.trim(), fallback_model: $('fallback-model').value.trim() };
    try {
      const s = await api('PUT', '/v1/orgs/' + state.me.org.id + '/settings/model', body);
      $('model').value = s.model;
      $('fallback-model').value = s.fallback_model;
      show($('settings-msg'), 'Saved: ' + s.model + ' (fallback ' + s.fallback_model + ').');
      $('settings-msg').className = 'note ok';
    } catch (err) {
      show($('settings-msg'), describe(err));
      $('settings-msg').className = 'note error';
    }
  }

  // ------------------------------------------------------------------ projects

  async function loadProjects() {
    try {
      const page = await api('GET', '/v1/projects?limit=200');
      state.projects = page.items;
    } catch (err) {
      show($('app-error'), describe(err));
      return;
    }
    const ul = $('projects');
    ul.replaceChildren(...state.projects.map((p) => h('li', { className: 'project', data: { id: p.id } },
      h('span', { className: 'name' }, p.name),
      p.description ? h('span', { className: 'hint' }, ' — ' + p.description) : null)));
    if (!state.projects.length) ul.append(h('li', { className: 'hint' }, 'No projects yet.'));
    const fs = $('conv-projects');
    fs.querySelectorAll('label').forEach((l) => l.remove());
    for (const p of state.projects) {
      fs.append(h('label', { className: 'check' },
        h('input', { type: 'checkbox', value: p.id }), ' ' + p.name));
    }
  }

  async function createProject() {
    const name = $('project-name').value.trim();
    const description = $('project-desc').value.trim();
    try {
      await api('POST', '/v1/projects', { name, description: description || null, visibility: 'org' });
      $('project-name').value = '';
      $('project-desc').value = '';
      show($('app-error'), '');
      await loadProjects();
    } catch (err) {
      show($('app-error'), describe(err));
    }
  }

  // ------------------------------------------------------------------ conversations

  async function loadConversations() {
    let page;
    try {
      page = await api('GET', '/v1/conversations?limit=200');
    } catch (err) {
      show($('app-error'), describe(err));
      return;
    }
    const ul = $('conversations');
    ul.replaceChildren(...page.items.map((c) => {
      const b = h('button', { type: 'button', className: 'link conversation', data: { id: c.id } }, c.title || 'Untitled');
      b.addEventListener('click', () => openConversation(c.id));
      return h('li', { className: state.conversation && state.conversation.id === c.id ? 'current' : '' }, b);
    }));
    if (!page.items.length) ul.append(h('li', { className: 'hint' }, 'No conversations yet.'));
  }

  async function createConversation() {
    const title = $('conv-title').value.trim();
    const ids = [...$('conv-projects').querySelectorAll('input:checked')].map((i) => i.value);
    const body = {};
    if (title) body.title = title;
    if (ids.length) body.project_ids = ids;
    try {
      const c = await api('POST', '/v1/conversations', body);
      $('conv-title').value = '';
      $('conv-projects').querySelectorAll('input:checked').forEach((i) => { i.checked = false; });
      show($('app-error'), '');
      await loadConversations();
      await openConversation(c.id);
    } catch (err) {
      show($('app-error'), describe(err));
    }
  }

  async function allPages(path) {
    const items = [];
    let cursor = null;
    for (let i = 0; i < 50; i++) {
      const sep = path.includes('?') ? '&' : '?';
      const page = await api('GET', path + sep + 'limit=200' + (cursor ? '&cursor=' + encodeURIComponent(cursor) : ''));
      items.push(...page.items);
      cursor = page.next_cursor;
      if (!cursor) break;
    }
    return items;
  }

  async function openConversation(id) {
    show($('chat-error'), '');
    show($('chat-status'), '');
    let conv, messages, actions;
    try {
      [conv, messages, actions] = await Promise.all([
        api('GET', '/v1/conversations/' + id),
        allPages('/v1/conversations/' + id + '/messages'),
        api('GET', '/v1/conversations/' + id + '/actions'),
      ]);
    } catch (err) {
      show($('app-error'), describe(err));
      return;
    }
    state.conversation = conv;
    $('chat-empty').hidden = true;
    $('chat-pane').hidden = false;
    $('chat-title').textContent = conv.title || 'Untitled';
    const names = (conv.project_ids || []).map((pid) => {
      const p = state.projects.find((x) => x.id === pid);
      return p ? p.name : pid;
    });
    $('chat-scope').textContent = names.length ? 'Narrowed to: ' + names.join(', ') : 'All the projects you can see';
    const box = $('messages');
    box.replaceChildren();
    const byResponse = new Map();
    for (const a of actions.items) {
      if (!byResponse.has(a.response_id)) byResponse.set(a.response_id, []);
      byResponse.get(a.response_id).push(a);
    }
    for (const m of messages) {
      const el = messageEl(m.role, m.content);
      if (m.response_id) el.dataset.responseId = m.response_id;
      box.append(el);
      if (m.role === 'assistant') {
        setCitations(el, m.citations);
        if (m.model) setModel(el, m.model);
        for (const a of byResponse.get(m.response_id) || []) box.append(actionEl(a));
        byResponse.delete(m.response_id);
      }
    }
    for (const rest of byResponse.values()) for (const a of rest) box.append(actionEl(a));
    document.querySelectorAll('#conversations li').forEach((li) => {
      const b = li.querySelector('button');
      li.className = b && b.dataset.id === id ? 'current' : '';
    });
    scrollDown();
  }

  function messageEl(role, text) {
    return h('div', { className: 'msg msg-' + role },
      h('div', { className: 'msg-role' }, role === 'user' ? 'You' : 'Assistant'),
      h('div', { className: 'msg-body' }, text),
      h('div', { className: 'msg-meta' }));
  }

  function setModel(el, model) {
    el.querySelector('.msg-meta').textContent = model;
  }

  function setCitations(el, citations) {
    const old = el.querySelector('.citations');
    if (old) old.remove();
    if (!citations || !citations.length) return;
    el.append(h('div', { className: 'citations' },
      h('span', { className: 'hint' }, 'Sources: '),
      h('ul', {}, ...citations.map((c) => h('li', { className: 'citation', title: c.source_kind + ' ' + c.source_id },
        c.title + ' (' + c.source_kind.replace(/_/g, ' ') + (c.chunk ? ', part ' + (c.chunk + 1) : '') + ')')))));
  }

  function scrollDown() {
    const box = $('messages');
    box.scrollTop = box.scrollHeight;
  }

  // ------------------------------------------------------------------ proposed actions

  function actionEl(a) {
    const status = h('span', { className: 'action-status status-' + (a.status || 'pending') }, a.status || 'pending');
    const confirm = h('button', { type: 'button', className: 'action-confirm' }, 'Confirm');
    const reject = h('button', { type: 'button', className: 'action-reject secondary' }, 'Reject');
    const buttons = h('div', { className: 'action-buttons' }, confirm, reject);
    const el = h('div', { className: 'action', data: { actionId: a.id } },
      h('div', { className: 'action-head' }, h('span', { className: 'action-label' }, 'Proposed action'), status),
      h('div', { className: 'action-summary' }, a.summary),
      h('div', { className: 'action-detail' }),
      buttons);
    confirm.addEventListener('click', () => confirmAction(a.id));
    reject.addEventListener('click', () => rejectAction(a.id));
    updateAction(el, a);
    return el;
  }

  function updateAction(el, a) {
    const status = a.status || 'pending';
    const s = el.querySelector('.action-status');
    s.textContent = status;
    s.className = 'action-status status-' + status;
    el.querySelector('.action-buttons').hidden = status !== 'pending';
    let detail = '';
    if (status === 'failed' && a.failure_reason) detail = 'Not done: ' + a.failure_reason;
    if (status === 'executed' && a.result && a.result.title) detail = 'Done: ' + a.result.title;
    el.querySelector('.action-detail').textContent = detail;
  }

  function actionElById(id) {
    return [...document.querySelectorAll('#messages .action')].find((e) => e.dataset.actionId === id);
  }

  async function refreshActions() {
    if (!state.conversation) return;
    try {
      const list = await api('GET', '/v1/conversations/' + state.conversation.id + '/actions');
      for (const a of list.items) {
        const el = actionElById(a.id);
        if (el) updateAction(el, a);
      }
    } catch (_) {
      // the next event or a reopen shows it
    }
  }

  async function confirmAction(id) {
    const el = actionElById(id);
    if (el) el.querySelector('.action-buttons').hidden = true;
    let r;
    try {
      r = await api('POST', '/v1/actions/' + id + '/confirm', {});
    } catch (err) {
      show($('chat-error'), describe(err));
      await refreshActions();
      return;
    }
    if (el) updateAction(el, r.action);
    // the assistant continues the conversation: stream its answer from the start
    const conversationId = state.conversation.id;
    const msg = messageEl('assistant', '');
    msg.dataset.responseId = r.response_id;
    $('messages').append(msg);
    const turn = newTurn(conversationId, msg, null);
    turn.responseId = r.response_id;
    turn.onEvent = () => { refreshActions(); };
    await followTurn(turn, null);
    await refreshActions();
  }

  async function rejectAction(id) {
    try {
      const a = await api('POST', '/v1/actions/' + id + '/reject', {});
      const el = actionElById(id);
      if (el) updateAction(el, a.action || a);
    } catch (err) {
      show($('chat-error'), describe(err));
    }
    await refreshActions();
  }

  // ------------------------------------------------------------------ streaming turns

  function newTurn(conversationId, el, userEl) {
    return { conversationId, el, userEl, responseId: null, lastEventId: null, text: '', done: false, onEvent: null };
  }

  // Read Server-Sent Events from a fetch response; `onEvent({id, event, data})` for each.
  async function readSse(resp, onEvent) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = '';
    let ev = { id: null, event: 'message', data: [] };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + (buf.startsWith('\r\n', nl) ? 2 : 1));
        if (line === '') {
          if (ev.data.length) {
            const stop = onEvent({ id: ev.id, event: ev.event, data: ev.data.join('\n') });
            if (stop) {
              reader.cancel().catch(() => {});
              return;
            }
          }
          ev = { id: null, event: 'message', data: [] };
          continue;
        }
        if (line.startsWith(':')) continue; // keep-alive comment
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? '' : line.slice(colon + 1);
        if (val.startsWith(' ')) val = val.slice(1);
        if (field === 'id') ev.id = val;
        else if (field === 'event') ev.event = val;
        else if (field === 'data') ev.data.push(val);
      }
    }
  }

  // Apply one event to the turn; true when the turn is over (completed or failed).
  function applyEvent(turn, raw) {
    let data = {};
    try {
      data = JSON.parse(raw.data);
    } catch (_) {
      return false;
    }
    if (raw.id) turn.lastEventId = raw.id;
    const body = turn.el.querySelector('.msg-body');
    switch (raw.event) {
      case 'message.created':
        turn.responseId = data.response_id;
        turn.el.dataset.responseId = data.response_id;
        if (turn.userEl) turn.userEl.dataset.messageId = data.message_id;
        break;
      case 'queued': {
        const why = data.reason === 'rate_limited' ? 'the model is rate limited' : 'other answers go first';
        show($('chat-status'), 'Waiting… position ' + data.position + ' (' + why + ')');
        break;
      }
      case 'token':
        show($('chat-status'), '');
        turn.el.classList.add('streaming');
        turn.text += data.text;
        body.textContent = turn.text;
        scrollDown();
        break;
      case 'response.restarted':
        // another worker restarts the answer: what came so far is discarded
        turn.text = '';
        body.textContent = '';
        show($('chat-status'), 'The answer restarted…');
        break;
      case 'action.proposed': {
        const a = Object.assign({ status: 'pending' }, data.action);
        if (!actionElById(a.id)) {
          const el = actionEl(a);
          let after = turn.el;
          while (after.nextElementSibling && after.nextElementSibling.classList.contains('action')) after = after.nextElementSibling;
          after.after(el);
        }
        break;
      }
      case 'message.completed': {
        const m = data.message || {};
        turn.text = m.content || turn.text;
        body.textContent = turn.text;
        turn.el.classList.remove('streaming');
        setCitations(turn.el, m.citations);
        if (data.model) setModel(turn.el, data.model);
        show($('chat-status'), '');
        turn.done = true;
        break;
      }
      case 'error':
        turn.el.classList.remove('streaming');
        turn.el.classList.add('failed');
        body.textContent = turn.text;
        turn.el.append(h('div', { className: 'error' }, describe({ code: data.code, message: data.message })));
        show($('chat-status'), '');
        turn.done = true;
        break;
      default:
        break;
    }
    if (turn.onEvent) turn.onEvent(raw.event);
    return turn.done;
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // Read a turn's stream to its end; on a dropped connection, resume with Last-Event-ID
  // (or, before the response id is known, repeat the POST with its Idempotency-Key).
  async function followTurn(turn, firstResp, repost) {
    let resp = firstResp;
    for (let attempt = 0; attempt < 8; attempt++) {
      try {
        if (!resp) {
          if (turn.responseId) {
            const headers = headersFor({ Accept: 'text/event-stream' });
            if (turn.lastEventId) headers['Last-Event-ID'] = turn.lastEventId;
            resp = await fetch('/v1/conversations/' + turn.conversationId + '/responses/' + turn.responseId + '/events', { headers });
          } else {
            resp = await repost();
          }
          if (!resp.ok) throw await errorOf(resp);
        }
        await readSse(resp, (raw) => applyEvent(turn, raw));
        if (turn.done) return;
      } catch (err) {
        if (err instanceof ApiError && err.status !== 503 && err.status !== 429) {
          turn.el.classList.remove('streaming');
          show($('chat-error'), describe(err));
          return;
        }
      }
      resp = null;
      show($('chat-status'), 'Connection lost; resuming…');
      await sleep(Math.min(500 * 2 ** attempt, 5000));
    }
    turn.el.classList.remove('streaming');
    show($('chat-status'), '');
    show($('chat-error'), 'The connection keeps dropping; reopen the conversation to see the answer.');
  }

  function idempotencyKey() {
    if (crypto.randomUUID) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    return [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  }

  async function sendMessage() {
    if (state.busy || !state.conversation) return;
    const input = $('composer-input');
    const content = input.value.trim();
    if (!content) return;
    state.busy = true;
    $('composer-send').disabled = true;
    show($('chat-error'), '');
    const conversationId = state.conversation.id;
    const key = idempotencyKey();
    const post = () => fetch('/v1/conversations/' + conversationId + '/messages', {
      method: 'POST',
      headers: headersFor({ 'Content-Type': 'application/json', Accept: 'text/event-stream', 'Idempotency-Key': key }),
      body: JSON.stringify({ content, stream: true }),
    });
    try {
      let resp;
      try {
        resp = await post();
      } catch (err) {
        resp = null; // the network failed: followTurn repeats the POST with the same key
      }
      if (resp && !resp.ok) {
        const err = await errorOf(resp);
        if (err.status === 401) signOut('Your session has ended; please sign in again.');
        show($('chat-error'), describe(err));
        return;
      }
      input.value = '';
      const userEl = messageEl('user', content);
      const msg = messageEl('assistant', '');
      msg.classList.add('streaming');
      $('messages').append(userEl, msg);
      scrollDown();
      const turn = newTurn(conversationId, msg, userEl);
      await followTurn(turn, resp, post);
    } finally {
      state.busy = false;
      $('composer-send').disabled = false;
    }
  }

  // ------------------------------------------------------------------ wiring

  function onSubmit(id, fn) {
    $(id).addEventListener('submit', async (e) => {
      e.preventDefault();
      try {
        await fn();
      } catch (err) {
        show($('app-error'), describe(err));
      }
    });
  }

  document.addEventListener('DOMContentLoaded', () => {
    onSubmit('signin-form', async () => {
      try {
        await signIn($('signin-email').value.trim(), $('signin-password').value);
        $('signin-password').value = '';
      } catch (err) {
        show($('auth-error'), describe(err));
      }
    });
    onSubmit('signup-form', async () => {
      try {
        await signUp($('signup-name').value.trim(), $('signup-email').value.trim(), $('signup-password').value, $('signup-org').value.trim());
        $('signup-password').value = '';
      } catch (err) {
        show($('auth-error'), describe(err));
      }
    });
    $('signout').addEventListener('click', () => signOut());
    onSubmit('settings-form', saveSettings);
    onSubmit('project-form', createProject);
    onSubmit('conv-form', createConversation);
    onSubmit('composer', sendMessage);
    $('composer-input').addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey) {
        e.preventDefault();
        sendMessage();
      }
    });
    start();
  });
})();
