// The Event Grid system topic of the source account (deployed at the source account's resource
// group, in its region). Its system-assigned identity delivers events to the jobs account's
// event queue (Storage Queue Data Message Sender, assigned by events-role.bicep).

param accountName string
param tags object = {}

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: accountName
}

resource topic 'Microsoft.EventGrid/systemTopics@2024-06-01-preview' = {
  name: 'evgt-lakeguard-${accountName}'
  location: account.location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    source: account.id
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
}

output name string = topic.name
output principalId string = topic.identity.principalId
