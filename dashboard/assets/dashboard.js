// oak-dashboard: loads a chosen SLA file into the editor's text area (the form then posts the text, so
// what is sent is what the user sees). Everything else is htmx attributes in the server's HTML.
document.addEventListener("change", (e) => {
  const input = e.target;
  if (!(input instanceof HTMLInputElement) || input.id !== "sla-file" || !input.files || !input.files[0]) {
    return;
  }
  input.files[0].text().then((text) => {
    document.getElementById("sla").value = text;
  });
});
