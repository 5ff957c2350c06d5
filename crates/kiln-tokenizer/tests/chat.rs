//! Chat template rendering: the real SmolLM2 template, representative Llama 3 and Qwen 2
//! templates, Gemma's built-in format, and the Jinja features Hugging Face templates use.

mod common;

use kiln_tokenizer::chat::{ChatTemplate, Message};
use kiln_tokenizer::TokenizerError;

fn conversation() -> Vec<Message> {
    vec![
        Message::new("system", "You are terse."),
        Message::new("user", "Hi"),
        Message::new("assistant", "Hello!"),
        Message::new("user", "Bye"),
    ]
}

#[test]
fn smollm2_template_multi_turn() {
    let m = common::smollm2();
    let t = m.tokenizer.chat_renderer(&m.architecture).unwrap().unwrap();
    assert_eq!(
        t.render(&conversation(), true).unwrap(),
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    // Without a system message the template supplies its default one; no generation prompt.
    assert_eq!(
        t.render(&[Message::new("user", "Hi")], false).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
}

/// Written in the style of Llama 3.1's template: block tags on their own lines (so trim_blocks
/// and lstrip_blocks matter), reassigning `messages`, `| trim`, `strftime_now` and a
/// `date_string` override.
const LLAMA3_STYLE: &str = r#"{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

#[test]
fn llama3_style_template() {
    let t = ChatTemplate::new(LLAMA3_STYLE, "<|begin_of_text|>", "<|eot_id|>").unwrap();
    let out = t
        .render_with(&conversation(), true, r#"{"date_string": "26 Jul 2024"}"#)
        .unwrap();
    assert_eq!(
        out,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
         Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n\
         You are terse.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    // Without the override the date comes from strftime_now: "DD Mon YYYY".
    let out = t
        .render(&[Message::new("user", "  padded  ")], false)
        .unwrap();
    let date = out
        .split("Today Date: ")
        .nth(1)
        .and_then(|rest| rest.split('\n').next())
        .unwrap();
    let parts: Vec<&str> = date.split(' ').collect();
    assert_eq!(parts.len(), 3, "{date:?}");
    assert!(parts[0].len() == 2 && parts[0].chars().all(|c| c.is_ascii_digit()));
    assert_eq!(parts[1].len(), 3);
    assert!(parts[2].len() == 4 && parts[2].starts_with("20"));
    assert!(out.ends_with("<|start_header_id|>user<|end_header_id|>\n\npadded<|eot_id|>"));
}

/// Written in the style of Qwen 2.5's template: ChatML with a default system prompt and a
/// tools block that serialises each tool with `tojson`.
const QWEN2_STYLE: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "system" %}
        {%- continue %}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

#[test]
fn qwen2_style_template() {
    let t = ChatTemplate::new(QWEN2_STYLE, "", "<|im_end|>").unwrap();
    assert_eq!(
        t.render(&conversation(), true).unwrap(),
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    assert_eq!(
        t.render(&[Message::new("user", "Hi")], true).unwrap(),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful \
         assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // Tools are written as Python's json.dumps would: keys in the given order, ", " and
    // ": " separators, non-ASCII kept, floats with a decimal point.
    let tools = r#"{"tools": [{"type": "function", "function": {"name": "get_weather",
        "description": "Météo \"now\"", "parameters": {"type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer", "maximum": 7.0}},
        "required": ["city"]}}}]}"#;
    let out = t
        .render_with(&[Message::new("user", "Weather in Paris?")], true, tools)
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful \
         assistant.\n\n# Tools\n\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": \
         \"get_weather\", \"description\": \"Météo \\\"now\\\"\", \"parameters\": {\"type\": \
         \"object\", \"properties\": {\"city\": {\"type\": \"string\"}, \"days\": {\"type\": \
         \"integer\", \"maximum\": 7.0}}, \"required\": [\"city\"]}}}\n</tools><|im_end|>\n\
         <|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn gemma_builtin_template() {
    let t = ChatTemplate::builtin("gemma3", "<bos>", "<eos>").unwrap();
    assert_eq!(
        t.render(&conversation(), true).unwrap(),
        "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n\
         <start_of_turn>model\nHello!<end_of_turn>\n\
         <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    );
    assert_eq!(
        t.render(&[Message::new("user", " What? ")], false).unwrap(),
        "<bos><start_of_turn>user\nWhat?<end_of_turn>\n"
    );
    let err = t
        .render(
            &[Message::new("user", "a"), Message::new("user", "b")],
            true,
        )
        .unwrap_err();
    assert!(
        matches!(err, TokenizerError::TemplateRaised(ref m) if m.contains("alternate")),
        "{err}"
    );
    for arch in ["gemma", "gemma2", "gemma3_text"] {
        assert!(ChatTemplate::builtin(arch, "<bos>", "<eos>").is_some());
    }
    assert!(ChatTemplate::builtin("llama", "<s>", "</s>").is_none());
}

#[test]
fn raise_exception_surfaces_its_message() {
    let src = "{% if messages[0]['role'] != 'user' %}\
               {{ raise_exception('The first message must come from the user, got ' ~ messages[0]['role']) }}\
               {% endif %}ok";
    let t = ChatTemplate::new(src, "", "").unwrap();
    assert_eq!(t.render(&[Message::new("user", "x")], false).unwrap(), "ok");
    match t.render(&[Message::new("assistant", "x")], false) {
        Err(TokenizerError::TemplateRaised(m)) => {
            assert_eq!(
                m,
                "The first message must come from the user, got assistant"
            )
        }
        other => panic!("expected a raised exception, got {other:?}"),
    }
}

#[test]
fn template_errors_are_reported() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}", "", "").unwrap_err();
    assert!(matches!(err, TokenizerError::Template(_)), "{err}");
    let t = ChatTemplate::new("{{ messages[0].content.nonexistent_method() }}", "", "").unwrap();
    assert!(matches!(
        t.render(&[Message::new("user", "x")], false),
        Err(TokenizerError::Template(_))
    ));
    let t = ChatTemplate::new("{{ x }}", "", "").unwrap();
    assert!(t.render_with(&[], false, "[1, 2]").is_err());
    assert!(t.render_with(&[], false, "{not json").is_err());
}

#[test]
fn python_string_methods_and_loop_controls() {
    let src = "{% for m in messages %}\n\
               {% if m.content.startswith('#') %}{% continue %}{% endif %}\n\
               {% if m.content.strip() == 'stop' %}{% break %}{% endif %}\n\
               [{{ m.role.upper() }}:{{ m.content.strip().split(',') | join('|') }}]\n\
               {% endfor %}\n\
               {% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}";
    let t = ChatTemplate::new(src, "", "").unwrap();
    let messages = [
        Message::new("user", " a,b "),
        Message::new("user", "# comment"),
        Message::new("assistant", "c"),
        Message::new("user", " stop "),
        Message::new("user", "never"),
    ];
    // trim_blocks drops the newline after each block tag; the expression lines keep theirs.
    assert_eq!(
        t.render(&messages, false).unwrap(),
        "[USER:a|b]\n[ASSISTANT:c]\na=1"
    );
}

#[test]
fn tojson_options() {
    let t = ChatTemplate::new(
        "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(separators=[',', ':']) }}|{{ x | tojson(ensure_ascii=true) }}|{{ x | tojson(sort_keys=true) }}|{{ [] | tojson(indent=2) }}",
        "",
        "",
    )
    .unwrap();
    let out = t
        .render_with(&[], false, r#"{"x": {"z": [1, 2.5, null], "a": "é<>&"}}"#)
        .unwrap();
    let parts: Vec<&str> = out.split('|').collect();
    assert_eq!(parts[0], r#"{"z": [1, 2.5, null], "a": "é<>&"}"#);
    assert_eq!(
        parts[1],
        "{\n  \"z\": [\n    1,\n    2.5,\n    null\n  ],\n  \"a\": \"é<>&\"\n}"
    );
    assert_eq!(parts[2], r#"{"z":[1,2.5,null],"a":"é<>&"}"#);
    assert_eq!(parts[3], r#"{"z": [1, 2.5, null], "a": "\u00e9<>&"}"#);
    assert_eq!(parts[4], r#"{"a": "é<>&", "z": [1, 2.5, null]}"#);
    assert_eq!(parts[5], "[]");
}

#[test]
fn chat_prompt_encodes_with_one_bos() {
    let m = common::gemma3();
    let tok = &m.tokenizer;
    let t = tok.chat_renderer(&m.architecture).unwrap().unwrap();
    let rendered = t.render(&conversation(), true).unwrap();
    assert!(rendered.starts_with("<bos><start_of_turn>user\n"));
    let ids = tok.encode_chat(&rendered).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 1);
    assert_eq!(ids[0], 2);
    assert_eq!(tok.decode(&ids, false), rendered);
    assert_eq!(
        tok.decode(&ids, true),
        "user\nYou are terse.\n\nHi\nmodel\nHello!\nuser\nBye\nmodel\n"
    );
}
