// oak-dashboard: loads a chosen SLA file into the editor's text area (the form then posts the text, so
// what is sent is what the user sees), and asks before scaling with the number typed. Everything else is
// htmx attributes in the server's HTML.
document.addEventListener("change", (e) => {
  const input = e.target;
  if (!(input instanceof HTMLInputElement) || input.id !== "sla-file" || !input.files || !input.files[0]) {
    return;
  }
  input.files[0].text().then((text) => {
    document.getElementById("sla").value = text;
  });
});

// A scale form asks for confirmation naming the service and the number of instances typed.
document.addEventListener("htmx:confirm", (e) => {
  const form = e.detail.elt;
  if (!(form instanceof HTMLFormElement) || !form.classList.contains("scale")) {
    return;
  }
  e.preventDefault();
  const n = form.querySelector('input[name="instances"]').value;
  if (confirm(`Scale ${form.dataset.serviceName} to ${n} instance(s)?`)) {
    e.detail.issueRequest(true);
  }
});
